"""Day-two operations on a real server: `doit run`, the app's deploy hooks, maintenance mode.
The tests of this module share one deployed server and run in order."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests

from scripts.loadgen import Load
from scripts.settings import REPO_ROOT
from tests.integration.helpers import DOIT, doit_env

pytestmark = pytest.mark.integration

DEPLOY_PATH = "/var/www/flask_helpdesk"


def doit_run(site, *command: str, **settings: str) -> subprocess.CompletedProcess:
    """`doit run -- COMMAND` as a user types it, in the toolkit's folder (doit.cfg), no TTY."""
    return subprocess.run([*DOIT, "--dir", str(site.work), "run", *command], cwd=REPO_ROOT,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
                          env=doit_env(site.sandbox.state_dir, **{**site.settings, **settings}))


def on_server(site, script: str, user: str = "deploy") -> tuple[int, str]:
    with (site.deploy_user() if user == "deploy" else site.admin()) as machine:
        status, stdout, stderr = machine["sh"]["-c", f"exec 2>&1; {script}"].run(retcode=None)
    return status, stdout + stderr


def hook(site, name: str, body: str) -> None:
    folder = site.app_dir / "deploy-hooks"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def remove_hooks(site) -> None:
    for path in (site.app_dir / "deploy-hooks").glob("*"):
        path.unlink()


@pytest.fixture(scope="module")
def deployed(site, tmp_path_factory):
    env_file = tmp_path_factory.mktemp("env") / "app.env"
    env_file.write_text("GREETING=hello-from-the-app-env\n")
    site.settings["APP_ENV_FILE"] = str(env_file)
    result = site.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    return site


# -- doit run -------------------------------------------------------------------------------------
def test_run_has_the_apps_environment_venv_and_release_and_returns_its_status(deployed):
    release = deployed.served_release()
    result = doit_run(deployed, "--", "sh", "-c",
                      'echo "greeting=$GREETING"; pwd; id -un; command -v python; '
                      'printf "literal=%s\\n" "$1"; exit 3', "sh", "$GREETING costs 5$")
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "greeting=hello-from-the-app-env" in lines
    assert f"{DEPLOY_PATH}/releases/{release}" in lines
    assert "www-data" in lines
    assert f"{DEPLOY_PATH}/current/.venv/bin/python" in lines
    assert "literal=$GREETING costs 5$" in lines  # systemd expanded none of it
    ok = doit_run(deployed, "--", "flask", "--app", "wsgi", "routes")
    assert ok.returncode == 0 and "/healthz" in ok.stdout, ok.stdout + ok.stderr


def test_run_with_a_terminal_gives_the_command_one(deployed):
    command = [*DOIT, "--dir", str(deployed.work), "run", "--", "sh", "-c", "tty; exit 5"]
    result = subprocess.run(["script", "-qec", subprocess.list2cmdline(command), "/dev/null"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env=doit_env(deployed.sandbox.state_dir, **deployed.settings))
    assert result.returncode == 5, result.stdout + result.stderr
    assert "/dev/pts/" in result.stdout
    assert "Connection to" not in result.stdout


def test_run_picks_a_server_and_says_which_exist(deployed):
    name = deployed.server.name
    assert doit_run(deployed, "--server", name, "--", "true").returncode == 0
    wrong = doit_run(deployed, "--server", "nope", "--", "true")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (f"error: --server nope: not one of the servers ({name})")
    bare = doit_run(deployed, "--")
    assert bare.returncode == 1 and bare.stderr.startswith("error: usage: doit run")
    # doit's own `run TASK` still works.
    assert doit_run(deployed, "status").returncode == 0


def test_run_on_several_servers_goes_one_after_another_with_prefixed_lines(deployed, tmp_path):
    """Two entries that reach the same server by two names: two servers to `doit run`."""
    port = deployed.server.ssh_port
    known = Path(deployed.sandbox.known_hosts_file).read_text()
    (tmp_path / "known_hosts").write_text(known + known.replace("[127.0.0.1]", "[localhost]"))
    first, second = f"127.0.0.1:{port}", f"localhost:{port}"
    fleet = {**deployed.as_remote_server(), "DEPLOY_SERVER": f"{first},{second}",
             "SSH_KNOWN_HOSTS_FILE": str(tmp_path / "known_hosts")}
    result = doit_run(deployed, "--", "sh", "-c", "echo out; echo err >&2; exit 3", **fleet)
    assert result.returncode == 3
    assert result.stdout.splitlines() == [f"{first}: out", f"{second}: out"]
    assert result.stderr.splitlines() == [
        f"{first}: err", f"{second}: err",
        f"error: the command failed on {first} (exit 3), {second} (exit 3)"]
    one = doit_run(deployed, "--server", second, "--", "echo", "just one", **fleet)
    assert one.returncode == 0 and one.stdout == "just one\n", one.stdout + one.stderr


def test_run_never_runs_as_root(deployed):
    """The runner takes the user from root's own file, never from its arguments, and refuses a
    root app user."""
    runner = "/usr/local/sbin/flask-helpdesk-run"
    status, output = on_server(deployed, f"""
        sudo -n {runner} --pipe current -- id -u; echo "plain $?"
        sudo -n {runner} --uid=0 current -- id -u; echo "uid $?"
        sudo -n {runner} --pipe current -- --uid=0 id -u; echo "after $?"
        sudo -n {runner} --pipe current --property=User=root -- id -u; echo "property $?"
        sudo -n -u root {runner} --pipe -- id -u; echo "no release $?"
        sudo -n -u www-data {runner} --pipe current -- id -u; echo "as www-data $?" """)
    lines = output.splitlines()
    assert "plain 0" in lines and lines[lines.index("plain 0") - 1] == "33", output
    for refused in ("uid", "property", "no release", "as www-data"):
        assert f"{refused} 0" not in lines, output
    # After `--` it is all the command's: env takes `--uid=0` for a variable, id says 33.
    assert "0" not in lines and lines[lines.index("after 0") - 1] == "33", output
    _, refused = on_server(deployed, f"""
        sed 's/^APP_USER = .*/APP_USER = "root"/' {runner} > /tmp/run-as-root
        sudo python3 -I -S /tmp/run-as-root --pipe current -- id -u; echo "status $?" """,
                           user="admin")
    assert "error: refusing to run as root" in refused and "status 2" in refused, refused


# -- deploy hooks -------------------------------------------------------------------------------
def test_a_failing_pre_switch_hook_leaves_the_old_release_serving(deployed):
    before = deployed.served_release()
    hook(deployed, "pre-switch", 'echo "checking $1 as $(id -un)"; exit 4')
    deployed.change_code("pre-switch fails")
    result = deployed.ship()
    assert result.returncode != 0
    assert f"checking {deployed.built_release()} as www-data" in result.stdout
    assert "error: " in result.stderr and "hook deploy-hooks/pre-switch failed (exit 4" \
        in result.stderr
    assert "FAILED   pre-switch" in result.stdout and "changed  switch" not in result.stdout
    assert deployed.served_release() == before


def test_a_failing_post_switch_hook_rolls_back(deployed):
    before = deployed.served_release()
    remove_hooks(deployed)
    hook(deployed, "post-switch", 'echo "post-switch of $1"; exit 6')
    deployed.change_code("post-switch fails")
    result = deployed.ship()
    assert result.returncode != 0
    assert "changed  switch" in result.stdout and "FAILED   post-switch" in result.stdout
    assert "AUTO_ROLLBACK=1: switched back" in result.stderr
    assert deployed.served_release() == before


def test_a_failing_post_switch_hook_without_auto_rollback_keeps_the_release_and_fails(deployed):
    remove_hooks(deployed)
    hook(deployed, "post-switch", "exit 7")
    deployed.change_code("post-switch fails, no rollback")
    result = deployed.ship(AUTO_ROLLBACK="0")
    release = deployed.built_release()
    assert result.returncode != 0
    assert "FAILED   post-switch" in result.stdout and "changed  finish" in result.stdout
    assert f"hook deploy-hooks/post-switch failed (exit 7); AUTO_ROLLBACK=0, so release " \
           f"{release} stays live" in result.stderr
    assert deployed.served_release() == release


def test_hooks_run_in_order_as_step_lines_and_a_dry_run_lists_them(deployed, tmp_path):
    remove_hooks(deployed)
    marks = tmp_path / "built"
    hook(deployed, "pre-build", f'echo pre >> {marks}')
    hook(deployed, "post-build", f'echo "post $DEPLOY_RELEASE" >> {marks}')
    for name in ("pre-migrate", "post-migrate", "pre-switch", "post-switch"):
        hook(deployed, name, f'echo "{name} of $1 in $(pwd)"')
    deployed.change_code("every hook")
    assert deployed.doit("-s", "build").returncode == 0
    release = deployed.built_release()
    assert marks.read_text().splitlines() == ["pre", f"post {release}"]
    dry = deployed.doit("-s", "ship", DRY_RUN="1")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    for name in ("pre-migrate", "post-migrate", "pre-switch", "post-switch"):
        assert f"would change {name}" in dry.stdout
    result = deployed.doit("-s", "ship")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split()[1] for line in result.stdout.splitlines()
             if line.startswith(("changed", "ok"))]
    order = [steps.index(name) for name in ("pre-migrate", "backup", "post-migrate",
                                            "preflight", "pre-switch", "switch", "restart",
                                            "post-switch")]
    assert order == sorted(order), steps
    assert f"| pre-switch of {release} in {DEPLOY_PATH}/releases/{release}" in result.stdout
    assert deployed.served_release() == release
    remove_hooks(deployed)


# -- maintenance mode ---------------------------------------------------------------------------
def test_maintenance_answers_503_publicly_while_the_server_reaches_the_app(deployed):
    with Load(deployed.url + "healthz", rate_per_s=40, max_seconds=60) as load:
        time.sleep(1)
        on = deployed.doit("maintenance", "on")
        assert on.returncode == 0 and "changed  maintenance" in on.stdout, on.stdout + on.stderr
        time.sleep(1)
        public = requests.get(deployed.url, timeout=10)
        challenge = requests.get(deployed.url + ".well-known/acme-challenge/x", timeout=10)
        _, inside = on_server(deployed, "curl -s -o /dev/null -w '%{http_code}' "
                                        "http://127.0.0.1/healthz")
        status = deployed.doit("status")
        again = deployed.doit("maintenance", "on")
        off = deployed.doit("maintenance", "off")
        time.sleep(1)
    assert public.status_code == 503 and public.headers["Retry-After"] == "60"
    assert "maintenance" in public.text.lower()
    assert inside == "200"
    assert challenge.status_code == 404  # the app's answer: certificate renewals go on
    assert "maintenance on since " in status.stdout
    assert again.returncode == 0 and "ok       maintenance" in again.stdout
    assert off.returncode == 0 and "changed  maintenance" in off.stdout
    assert requests.get(deployed.url, timeout=10).status_code == 200
    # Switching on and off, every request got an answer: the app's, or the 503 page.
    assert load.report.failures and set(
        failure.split(" ", 1)[1] for failure in load.report.failures) == {"HTTP 503"}, \
        load.report.failures
    assert sum(load.report.releases.values()) > 0
    assert "maintenance off" in deployed.doit("status").stdout


def test_maintenance_serves_the_apps_own_page(deployed):
    (deployed.app_dir / "maintenance.html").write_text("<h1>Helpdesk is upgrading</h1>\n")
    deployed.change_code("with a maintenance page")
    assert deployed.deploy().returncode == 0
    assert deployed.doit("maintenance", "on").returncode == 0
    try:
        page = requests.get(deployed.url + "tickets/new", timeout=10)
        verified = deployed.doit("-s", "verify")  # the 503 is on purpose: no rollback
    finally:
        assert deployed.doit("maintenance", "off").returncode == 0
    assert page.status_code == 503 and page.text == "<h1>Helpdesk is upgrading</h1>\n"
    assert page.headers["Retry-After"] == "60"
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "not checked, maintenance mode is on" in verified.stdout


def test_maintenance_during_migrations_only_when_they_run(deployed):
    watched = {"MIGRATIONS_PATHS": "helpdesk/db.py", "MAINTENANCE_DURING_MIGRATIONS": "1"}
    deployed.change_code("code only")
    result = deployed.ship(**watched)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "maintenance" not in result.stdout
    db = deployed.app_dir / "helpdesk" / "db.py"
    db.write_text(db.read_text() + "\n# a migration changed\n")
    result = deployed.ship(**watched)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "maintenance" in line]
    assert len(lines) == 2 and "on for the migrations" in lines[0] \
        and "off after the migrations" in lines[1], result.stdout
    assert requests.get(deployed.url, timeout=10).status_code == 200
    _, flag = on_server(deployed, f"test -e {DEPLOY_PATH}/shared/maintenance.on; echo $?")
    assert flag.strip() == "1"


def test_a_run_from_the_deploy_user_reaches_no_root_file(deployed):
    """The runner's command and the hooks live in the service's sandbox: read-only system and
    code, no privileges to gain, nothing of root's to read."""
    result = doit_run(deployed, "--", "sh", "-c", f"""
        grep -E '^(NoNewPrivs|CapEff|Seccomp):' /proc/self/status
        touch /etc/run-was-here /usr/local/sbin/run-was-here {DEPLOY_PATH}/current/x \
            && echo WROTE
        sudo -n id; cat /etc/flask-helpdesk/app.env; ls /root /home
        touch {DEPLOY_PATH}/shared/instance/run-may-write && echo instance-ok""")
    out = result.stdout + result.stderr
    assert "NoNewPrivs:\t1" in out and "CapEff:\t0000000000000000" in out
    assert "Seccomp:\t2" in out
    assert "WROTE" not in out and "uid=0" not in out and "GREETING" not in out
    assert "instance-ok" in out
    _, planted = on_server(deployed, f"""
        ln -sfn /root {DEPLOY_PATH}/releases/evil
        sudo -n /usr/local/sbin/flask-helpdesk-run --pipe evil -- ls; echo "evil $?"
        sudo -n /usr/local/sbin/flask-helpdesk-run --pipe ../../../root -- ls; echo "dots $?"
        rm -f {DEPLOY_PATH}/releases/evil""")
    assert "evil 0" not in planted and "dots 2" in planted, planted
    _, traces = on_server(deployed, "ls /etc/run-was-here /usr/local/sbin/run-was-here; "
                                    f"sudo rm -f {DEPLOY_PATH}/shared/instance/run-may-write",
                          user="admin")
    assert "No such file" in traces and traces.count("No such file") == 2, traces
