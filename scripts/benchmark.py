"""Benchmark: wall times and sizes of what users wait for, as a table and as JSON.

    python -m scripts.benchmark [--only build,sandbox] [--json bench-results.json]

Targets (goals) sit beside each number; they are measured here, never asserted in tests."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.loadgen import Load
from scripts.settings import REPO_ROOT, load_settings

DOIT = [sys.executable, "-m", "doit", "-f", str(REPO_ROOT / "dodo.py")]


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    goal: str = ""


def _timed(argv: list[str], env: dict, cwd: Path | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def _busy_cpu_s() -> float:
    """CPU seconds this host has spent busy so far (all cores: the servers run here too)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children: the doit commands and their ssh."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_build(work: Path) -> list[Row]:
    app_dir = work / "helpdesk"
    shutil.copytree(REPO_ROOT / "examples" / "helpdesk", app_dir,
                    ignore=shutil.ignore_patterns("__pycache__", "instance", "tests"))
    env = {**os.environ, "APP_DIR": str(app_dir), "DIST_DIR": str(work / "dist"),
           "WHEEL_CACHE": str(work / "wheels"), "PYTHONPATH": str(REPO_ROOT)}
    build = [*DOIT, "--dir", str(work), "build"]
    cold = _timed(build, env)  # empty wheel cache: downloads wheels
    full = []
    for _ in range(3):  # wheels cached, doit state and dist/ gone: a full package build
        shutil.rmtree(work / "dist")
        (work / ".doit.db").unlink()
        full.append(_timed(build, env))
    noop = [_timed(build, env) for _ in range(5)]
    record = json.loads((work / "dist" / "helpdesk.json").read_text())
    manifest_sizes = _package_sizes(work / "dist" / record["package"])
    return [
        Row("build", "no-op `doit build` (median of 5)", statistics.median(noop), "s", "< 0.5 s"),
        Row("build", "full build, wheels cached (median of 3)", statistics.median(full), "s"),
        Row("build", "first build, wheels downloaded", cold, "s"),
        Row("build", "package size", record["size"] / 1e6, "MB", "< 20 MB"),
        Row("build", "app files without wheels (uncompressed)", manifest_sizes["app"] / 1e6,
            "MB", "< 1 MB"),
        Row("build", "wheels (uncompressed)", manifest_sizes["wheels"] / 1e6, "MB"),
    ]


def _package_sizes(package: Path) -> dict:
    from scripts.build.package import verify_package
    manifest = verify_package(package)
    return {"app": sum(e["size"] for e in manifest["files"]),
            "wheels": sum(e["size"] for e in manifest["wheels"])}


def bench_sandbox(work: Path) -> list[Row]:
    from scripts.sandbox import Sandbox
    from scripts.sandbox.image import ensure_image

    settings = load_settings()
    sandbox = Sandbox(work / "sandbox", settings.sandbox_cache, settings.sandbox_mirror,
                      log=lambda *_: None, suite=settings.sandbox_suite)
    started = time.perf_counter()
    ensure_image(settings.sandbox_cache, sandbox.mirror, sandbox.suite)
    image = time.perf_counter() - started
    try:
        started = time.perf_counter()
        sandbox.up(1)
        boot_one = time.perf_counter() - started
        started = time.perf_counter()
        sandbox.up(1)
        reuse = time.perf_counter() - started
        started = time.perf_counter()
        sandbox.up(3)
        boot_two_more = time.perf_counter() - started
    finally:
        started = time.perf_counter()
        sandbox.down()
        down = time.perf_counter() - started
    return [
        Row("sandbox", "image ready (cached after the first run: ~70-95 s)", image, "s"),
        Row("sandbox", "boot 1 server", boot_one, "s", "< 15 s"),
        Row("sandbox", "`up` again, server reused", reuse, "s", "< 2 s"),
        Row("sandbox", "boot 2 more servers in parallel", boot_two_more, "s"),
        Row("sandbox", "down 3 servers", down, "s"),
    ]


def _doit_in_sandbox(work: Path, sandbox_dir: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "DEPLOY_SERVER"}
    return {**env, "ENV_FILE": os.devnull, "SANDBOX_DIR": str(sandbox_dir),
            "PYTHONPATH": str(REPO_ROOT)}


def bench_server(work: Path) -> list[Row]:
    """Setup and deploys on one fresh sandbox server, as a user runs them."""
    from scripts.sandbox import Sandbox

    settings = load_settings()
    sandbox = Sandbox(work / "sandbox", settings.sandbox_cache, settings.sandbox_mirror,
                      log=lambda *_: None, suite=settings.sandbox_suite)
    app_dir = work / "helpdesk"
    shutil.copytree(REPO_ROOT / "examples" / "helpdesk", app_dir,
                    ignore=shutil.ignore_patterns("__pycache__", "instance", "tests"))
    env = {**_doit_in_sandbox(work, sandbox.state_dir), "APP_DIR": str(app_dir),
           "DIST_DIR": str(work / "dist"), "WHEEL_CACHE": str(settings.wheel_cache)}
    doit = lambda *args: [*DOIT, "--dir", str(work), *args]  # noqa: E731
    views = app_dir / "helpdesk" / "views.py"

    def change_code(number: int) -> None:
        views.write_text(views.read_text() + f"\n# benchmark change {number}\n")

    try:
        sandbox.up(1)
        setup_first = _timed(doit("setup"), env)
        setup_again = [_timed(doit("setup"), env) for _ in range(3)]
        _timed(doit("build"), env)
        cold = _timed(doit("-s", "ship"), env)
        same = [_timed(doit("-s", "ship"), env) for _ in range(3)]
        warm, warm_full, warm_skip, rollback = [], [], [], []
        for number in range(3):
            change_code(number)
            _timed(doit("build"), env)
            warm.append(_timed(doit("-s", "ship"), env))
            rollback.append(_timed(doit("rollback"), env))
            _timed(doit("-s", "ship"), env)
        # Under steady traffic, separately: the load's own CPU would slow the timings above.
        url = sandbox.servers()[0].url + "healthz"
        with Load(url, rate_per_s=40, max_requests=20000, max_seconds=300) as load:
            for number in range(3, 6):
                change_code(number)
                _timed(doit("build"), env)
                _timed(doit("-s", "ship"), env)
                _timed(doit("rollback"), env)
                _timed(doit("-s", "ship"), env)
        for number in range(6, 8):
            change_code(number)
            warm_full.append(_timed(doit("deploy"), env))
        watched = {**env, "MIGRATIONS_PATHS": "helpdesk/db.py"}
        for number in range(8, 11):
            change_code(number)
            _timed(doit("build"), env)
            warm_skip.append(_timed(doit("-s", "ship"), watched))
    finally:
        sandbox.down()
    median = statistics.median
    return [
        Row("setup", "first `doit setup` on a bare server (.debs cached)", setup_first, "s"),
        Row("setup", "`doit setup` again, nothing to do (median of 3)", median(setup_again),
            "s"),
        Row("deploy", "cold deploy: `doit -s ship`, venv built", cold, "s"),
        Row("deploy", "warm deploy: `doit -s ship` of a code change (median of 3)",
            median(warm), "s", "< 5 s (aim ~2 s)"),
        Row("deploy", "warm deploy as above, MIGRATIONS_PATHS unchanged (median of 3)",
            median(warm_skip), "s", "aim ~2 s"),
        Row("deploy", "warm `doit deploy`: build+check+ship+verify (median of 2)",
            median(warm_full), "s"),
        Row("deploy", "same package again: `doit -s ship` (median of 3)", median(same), "s",
            "< 2 s"),
        Row("deploy", "`doit rollback` (median of 3)", median(rollback), "s", "< 2 s (aim ~1 s)"),
        Row("load", "requests sent during 6 deploys and 3 rollbacks (40/s)", load.report.sent,
            "req"),
        Row("load", "failed requests (errors or non-2xx)", len(load.report.failures), "req",
            "0 (Ansible, pyinfra: 10-20 per restart)"),
        Row("load", "worst latency during them", load.report.worst_latency_s, "s"),
    ]


STEP_LINE = re.compile(r"^(?:\S+: )?(?:changed|ok|would change)\s+(\S+)\s+([\d.]+) s\b")
# Where each stage of `doit deploy` starts: its first line (doit names no hidden task).
STAGES = (("target", re.compile(r"^(?:ok|changed)\s+target ")),
          ("build", re.compile(r"^build: ")),
          ("check", re.compile(r"^(?:ok|FAILED)\s+package ")),
          ("ship", re.compile(r"^(?:changed\s+lock |ok: release |changed\s+preflight |ok\s+preflight )")),
          ("verify", re.compile(r"^(?:ok|FAILED)\s+\S+ is \w+$|^verify: ")))


@dataclass
class Run:
    """One doit command, watched: its wall time, when each doit task started (seconds from
    the start; "start-up" is Python and doit before the first task), the step lines' own
    times, and the CPU it cost here and on the server."""
    seconds: float
    tasks: dict[str, float]
    steps: dict[str, float]
    local_cpu_s: float
    server_cpu_s: float
    output: str = ""


def _server_cpu_s(init_pid: int) -> float:
    """CPU seconds the server's processes have used: every live process in its PID namespace,
    with its reaped children (a process that ends moves into its parent's share, so a
    difference of two readings counts each process once)."""
    namespace = os.readlink(f"/proc/{init_pid}/ns/pid")
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _watched(argv: list[str], env: dict, init_pid: int) -> Run:
    """Run a doit command, timing its tasks from the lines it prints as it goes."""
    local, server = _children_cpu_s(), _server_cpu_s(init_pid)
    started = time.perf_counter()
    process = subprocess.Popen(argv, env={**env, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1)
    tasks: dict[str, float] = {}
    steps: dict[str, float] = {}
    output = []
    for line in process.stdout:
        output.append(line)
        now = time.perf_counter() - started
        if not tasks:
            tasks["first line (Python, doit)"] = now
        for stage, marker in STAGES:
            if stage not in tasks and marker.match(line):
                tasks[stage] = now
        step = STEP_LINE.match(line)
        if step:
            steps[step.group(1)] = float(step.group(2))
    process.wait()
    seconds = time.perf_counter() - started
    tasks["end"] = seconds
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{''.join(output)}")
    return Run(seconds, tasks, steps, _children_cpu_s() - local,
               _server_cpu_s(init_pid) - server, "".join(output))


def _waterfall(title: str, runs: list[Run]) -> list[str]:
    """When each stage started (median seconds from the command's start: its first line),
    then the median time of each step line, in order."""
    median = statistics.median
    lines = [f"{title} (median of {len(runs)}: {median(r.seconds for r in runs):.2f} s)"]
    names = list(dict.fromkeys(name for run in runs for name in run.tasks))
    for name in names:
        starts = [run.tasks[name] for run in runs if name in run.tasks]
        lines.append(f"  {median(starts):6.2f} s  {name}")
    steps = list(dict.fromkeys(name for run in runs for name in run.steps))
    for name in steps:
        took = [run.steps[name] for run in runs if name in run.steps]
        lines.append(f"          {median(took):5.2f} s  step {name}")
    return lines


WATERFALLS: list[str] = []  # printed after the table
OUTPUTS: dict[str, str] = {}  # the last run of each kind, as printed, in the JSON


def _provisioned(work: Path, name: str):
    """Settings, the provisioned layer, a sandbox (not booted yet) that boots from it, and a
    private copy of the bundled app."""
    from scripts.sandbox import Sandbox
    from scripts.sandbox.layers import ensure_provisioned_layer

    settings = load_settings()
    layer = ensure_provisioned_layer(settings.sandbox_cache, settings.sandbox_mirror, work,
                                     settings.sandbox_suite)
    sandbox = Sandbox(work / name, settings.sandbox_cache, settings.sandbox_mirror,
                      log=lambda *_: None, suite=settings.sandbox_suite)
    app_dir = work / "helpdesk"
    shutil.copytree(REPO_ROOT / "examples" / "helpdesk", app_dir,
                    ignore=shutil.ignore_patterns("__pycache__", "instance", "tests"))
    return settings, layer, sandbox, app_dir


def bench_deploy(work: Path, rounds: int = 5) -> list[Row]:
    """The issue #16 goals on one provisioned server: warm `doit deploy` of a code change (its
    migrations unchanged, so skipped), the same package again, `doit rollback` (medians of
    `rounds`), each with its waterfall and CPU; then a change to the migrations, and deploys
    and rollbacks under steady reads and writes, counting failed requests."""
    settings, layer, sandbox, app_dir = _provisioned(work, "one")
    views = app_dir / "helpdesk" / "views.py"
    median = statistics.median
    try:
        (server,) = sandbox.up(1, layer=layer)
        env = {**_doit_in_sandbox(work, sandbox.state_dir), "APP_DIR": str(app_dir),
               "DIST_DIR": str(work / "dist"), "WHEEL_CACHE": str(settings.wheel_cache),
               "DEPLOY_SERVER": f"127.0.0.1:{server.ssh_port}",
               "SSH_KEY_FILE": str(sandbox.deploy_key_file),
               "SETUP_USER": "admin", "SETUP_KEY_FILE": str(sandbox.key_file),
               "PUBLIC_URL": server.url,
               "SSH_KNOWN_HOSTS_FILE": str(sandbox.known_hosts_file)}
        doit = lambda *args: [*DOIT, "--dir", str(work), *args]  # noqa: E731
        _timed(doit("deploy"), env)  # cold: venv, setup stamp, target
        warm, same, rollback = [], [], []
        for number in range(rounds):
            views.write_text(views.read_text() + f"\n# benchmark change {number}\n")
            warm.append(_watched(doit("deploy"), env, server.init_pid))
            same.append(_watched(doit("deploy"), env, server.init_pid))
            rollback.append(_watched(doit("rollback"), env, server.init_pid))
        # The bundled app declares its migrations (helpdesk/db.py, in its pyproject.toml), so
        # the code changes above skip them; a change there runs them.
        migrations = app_dir / "helpdesk" / "db.py"
        migrated = []
        for number in range(3):
            migrations.write_text(migrations.read_text() + f"\n# benchmark migrate {number}\n")
            migrated.append(_watched(doit("deploy"), env, server.init_pid))
        listed = [_timed([*DOIT, "list"], env) for _ in range(rounds)]
        reads = Load(server.url + "healthz", rate_per_s=20, max_requests=20000,
                     max_seconds=300)
        writes = Load(server.url + "api/tickets", rate_per_s=20, max_requests=20000,
                      max_seconds=300, writes="bench")
        with reads, writes:
            for number in range(3):
                views.write_text(views.read_text() + f"\n# benchmark load {number}\n")
                _timed(doit("deploy"), env)
                _timed(doit("rollback"), env)
    finally:
        sandbox.down()
    OUTPUTS.update(warm=warm[-1].output, same=same[-1].output, rollback=rollback[-1].output)
    WATERFALLS.extend(_waterfall("warm `doit deploy` of a code change", warm))
    WATERFALLS.extend(_waterfall("`doit deploy` of the same package", same))
    WATERFALLS.extend(_waterfall("`doit rollback`", rollback))
    WATERFALLS.extend(_waterfall("warm `doit deploy` of a change to the migrations", migrated))
    cpu = lambda runs, key: median(getattr(run, key) for run in runs)  # noqa: E731
    failed = len(reads.report.failures) + len(writes.report.failures)
    return [
        Row("deploy", f"warm `doit deploy` of a code change (median of {rounds})",
            median(r.seconds for r in warm), "s", "<= 2.0 s"),
        Row("deploy", f"`doit deploy` of the same package (median of {rounds})",
            median(r.seconds for r in same), "s", "<= 0.8 s"),
        Row("deploy", f"`doit rollback` (median of {rounds})",
            median(r.seconds for r in rollback), "s", "<= 0.8 s"),
        Row("deploy", "warm `doit deploy` of a change to the migrations, which run "
            "(median of 3)", median(r.seconds for r in migrated), "s"),
        Row("deploy", "CPU of a warm deploy: server", cpu(warm, "server_cpu_s"), "s"),
        Row("deploy", "CPU of a warm deploy: deploying machine", cpu(warm, "local_cpu_s"), "s"),
        Row("deploy", "CPU of a warm deploy: both",
            median(r.server_cpu_s + r.local_cpu_s for r in warm), "s", "<= 1.5 s"),
        Row("deploy", "CPU of a rollback: both",
            median(r.server_cpu_s + r.local_cpu_s for r in rollback), "s"),
        Row("deploy", "`doit list` (Python and doit start-up)", median(listed), "s"),
        Row("load", "reads and writes sent during 3 deploys and 3 rollbacks (20+20/s)",
            reads.report.sent + writes.report.sent, "req"),
        Row("load", "failed requests, reads and writes (errors or non-2xx)", failed, "req",
            "0"),
        Row("load", "worst latency during them",
            max(reads.report.worst_latency_s, writes.report.worst_latency_s), "s"),
    ]


def bench_fleet(work: Path) -> list[Row]:
    """Deploy times for 1, 2, 4 and 8 servers booted from the provisioned layer."""
    settings, layer, sandbox, app_dir = _provisioned(work, "fleet")
    views = app_dir / "helpdesk" / "views.py"
    rows = []
    try:
        servers = sandbox.up(8, layer=layer)
        base = {**_doit_in_sandbox(work, sandbox.state_dir), "APP_DIR": str(app_dir),
                "DIST_DIR": str(work / "dist"), "WHEEL_CACHE": str(settings.wheel_cache),
                "SSH_KEY_FILE": str(sandbox.deploy_key_file),
                "SSH_KNOWN_HOSTS_FILE": str(sandbox.known_hosts_file)}
        doit = lambda *args: [*DOIT, "--dir", str(work), *args]  # noqa: E731
        every = ",".join(f"127.0.0.1:{s.ssh_port}" for s in servers)
        _timed(doit("build"), base)
        _timed(doit("-s", "ship"), {**base, "DEPLOY_SERVER": every, "DEPLOY_PARALLEL": "8"})
        cpu_per_server, deployer_cpu = {}, {}
        for count in (1, 2, 4, 8):
            hosts = ",".join(f"127.0.0.1:{s.ssh_port}" for s in servers[:count])
            for batch in ("1", "50%"):
                views.write_text(views.read_text() + f"\n# fleet {count} {batch}\n")
                _timed(doit("build"), base)
                busy, deployer = _busy_cpu_s(), _children_cpu_s()
                seconds = _timed(doit("-s", "ship"), {**base, "DEPLOY_SERVER": hosts,
                                                      "DEPLOY_BATCH": batch})
                cpu_per_server[count] = (_busy_cpu_s() - busy) / count
                deployer_cpu[count] = _children_cpu_s() - deployer
                rows.append(Row("fleet", f"code change to {count} server(s), batch {batch}",
                                seconds, "s", "8 servers < 2x one" if count == 8 else ""))
        # All servers share this host's cores: a fleet deploy cannot beat its CPU work / cores.
        cores = os.cpu_count() or 1
        rows += [Row("fleet", "host CPU per server, 1-server deploy (servers + deployer)",
                     cpu_per_server[1], "s"),
                 Row("fleet", "host CPU per server, 8-server deploy", cpu_per_server[8], "s"),
                 Row("fleet", f"floor for 8 servers sharing {cores} cores (8 x CPU / cores)",
                     8 * cpu_per_server[8] / cores, "s"),
                 Row("fleet", "deploying machine's CPU for 8 servers (doit, ssh)",
                     deployer_cpu[8], "s")]
    finally:
        sandbox.down()
    return rows


SECTIONS = {"build": bench_build, "sandbox": bench_sandbox, "server": bench_server,
            "deploy": bench_deploy, "fleet": bench_fleet}


def print_table(rows: list[Row]) -> None:
    width = max(len(row.name) for row in rows)
    print(f"| section | {'measure':{width}} | {'value':>9} | unit | goal |")
    print(f"|---|{'-' * (width + 2)}|---:|---|---|")
    for row in rows:
        print(f"| {row.section} | {row.name:{width}} | {row.value:9.3f} | {row.unit} | "
              f"{row.goal} |")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--json", default=str(REPO_ROOT / "bench-results.json"))
    args = parser.parse_args(argv)
    rows: list[Row] = []
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    for section in args.only.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-{section}-") as work:
            rows += SECTIONS[section](Path(work))
    print_table(rows)
    print(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
    for line in WATERFALLS:
        print(line)
    meta = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_before": load_before, "load_average_after": os.getloadavg()}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows],
                                           "waterfalls": WATERFALLS, "outputs": OUTPUTS},
                                          indent=2) + "\n")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
