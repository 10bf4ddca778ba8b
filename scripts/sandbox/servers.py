"""Throwaway Debian servers (12 or 13): an overlay copy of the cached image booted with systemd-nspawn in a
private network namespace, reachable only through socat forwarders on 127.0.0.1.

`Sandbox.up` is idempotent (healthy servers are reused), `Sandbox.down` ends exactly the processes
it started and leaves no mount or copy behind. The state file (servers.json) is what tools and tests
read to find ports, keys and known_hosts."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.sandbox import processes
from scripts.sandbox.image import ADMIN_USER, APT_PROXY_PORT, DEFAULT_SUITE, SUITES, ensure_image
from scripts.sandbox.mirror import DebianMirror, resolve_mirror

BOOT_TIMEOUT_S = 60
SHUTDOWN_GRACE_S = 10
REQUIRED_TOOLS = {  # command: Debian package that provides it
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "socat": "socat",
    "nsenter": "util-linux",
    "ssh-keygen": "openssh-client",
    "mount": "mount",
}


@dataclass
class Helper:
    """A process group we started, and the text its command line must hold to be ours."""
    pgid: int
    marker: str


@dataclass
class SandboxServer:
    name: str
    ssh_port: int
    http_port: int
    root_dir: str
    nspawn_pid: int = 0
    init_pid: int = 0
    host_key: str = ""
    helpers: list[Helper] = field(default_factory=list)
    inside_ssh_port: int = 22  # where sshd listens inside; ssh_port forwards there
    ipv6: bool = False         # also reachable on [::1], at the same ports

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    @property
    def nspawn_marker(self) -> str:
        return f"--machine={self.name}"

    def known_hosts_line(self) -> str:
        line = f"[127.0.0.1]:{self.ssh_port} {self.host_key}"
        return line + (f"\n[::1]:{self.ssh_port} {self.host_key}" if self.ipv6 else "")


def check_host_ready() -> None:
    """One clear line when this machine cannot run sandbox servers."""
    if os.geteuid() != 0:
        raise ToolkitError("sandbox: needs root (it mounts overlays and runs systemd-nspawn); "
                           "run it as root, e.g. `sudo doit sandbox`")
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None:
            raise ToolkitError(f"sandbox: `{tool}` is not installed; install it with "
                               f"`apt-get install {package}`")


class Sandbox:
    """The sandbox servers recorded in one state folder."""

    def __init__(self, state_dir: Path, cache_dir: Path, mirror: str = "",
                 preferred_ssh_port: int | None = None, preferred_http_port: int | None = None,
                 log=print, suite: str = DEFAULT_SUITE, inside_ssh_port: int = 22,
                 ipv6: bool = False):
        if suite not in SUITES:
            raise ToolkitError(f"setting SANDBOX_SUITE={suite!r} is not a Debian release the "
                               f"sandbox boots; use one of {', '.join(SUITES)}")
        self.state_dir = state_dir
        self.cache_dir = cache_dir
        self.mirror_setting = mirror  # SANDBOX_MIRROR; empty: this machine's apt sources
        self.suite = suite
        self.preferred_ssh_port = preferred_ssh_port
        self.preferred_http_port = preferred_http_port
        self.log = log
        # Server shapes (new servers only): sshd on another port inside, and [::1] forwards.
        self.inside_ssh_port = inside_ssh_port
        self.ipv6 = ipv6
        # Machine names must be unique on this host (nspawn keeps per-name runtime folders).
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:4]
        self.name_prefix = f"sbx{digest}"

    @functools.cached_property
    def mirror(self) -> DebianMirror:
        return resolve_mirror(self.mirror_setting)

    # -- files other tools read -------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "servers.json"

    @property
    def key_file(self) -> Path:
        """Root's and the admin user's key. Keys live beside the image, shared by every
        sandbox on this machine, so a provisioned snapshot boots with keys that work."""
        return self.cache_dir / "keys" / "admin_ed25519"

    @property
    def known_hosts_file(self) -> Path:
        return self.state_dir / "known_hosts"

    def servers(self) -> list[SandboxServer]:
        if not self.state_file.exists():
            return []
        data = json.loads(self.state_file.read_text())
        return [SandboxServer(**{**entry, "helpers": [Helper(**h) for h in entry["helpers"]]})
                for entry in data["servers"]]

    def _save(self, servers: list[SandboxServer]) -> None:
        servers = sorted(servers, key=lambda s: _index(s.name))
        data = {"key_file": str(self.key_file), "known_hosts_file": str(self.known_hosts_file),
                "user": "root", "servers": [asdict(s) for s in servers]}
        _write_atomically(self.state_file, json.dumps(data, indent=2) + "\n")
        _write_atomically(self.known_hosts_file,
                          "".join(s.known_hosts_line() + "\n" for s in servers))

    # -- lifecycle ----------------------------------------------------------------------------
    def up(self, count: int, layer: Path | None = None) -> list[SandboxServer]:
        """Ensure servers 1..count run; reuse healthy ones, replace broken ones. New servers
        boot from `layer` (a saved server, see save_layer) on top of the image, if given."""
        check_host_ready()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_key()
        kept = []
        for server in self.servers():
            if self.is_healthy(server):
                kept.append(server)
            else:
                self.log(f"sandbox: {server.name} is not healthy; replacing it")
                self._destroy(server)
        self._save(kept)
        wanted = [f"{self.name_prefix}-{i}" for i in range(1, count + 1)]
        missing = [name for name in wanted if name not in {s.name for s in kept}]
        if not missing:
            return kept
        image_dir = ensure_image(self.cache_dir, self.mirror, self.suite, self.log)
        planned = self._plan(missing, kept)
        with ThreadPoolExecutor(max_workers=len(planned)) as pool:
            lower = f"{layer}:{image_dir}" if layer else str(image_dir)
            outcomes = list(pool.map(lambda server: self._boot_or_clean(server, lower),
                                     planned))
        booted = [outcome for outcome in outcomes if isinstance(outcome, SandboxServer)]
        self._save(kept + booted)
        failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        if failures:
            raise failures[0]
        return sorted(kept + booted, key=lambda s: _index(s.name))

    def down(self) -> list[str]:
        """Stop every recorded server and remove its copy; returns the names it stopped."""
        check_host_ready()
        servers = self.servers()
        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
            list(pool.map(self._destroy, servers))
        self._unmount_leftovers()
        shutil.rmtree(self.state_dir / "servers", ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        self.known_hosts_file.unlink(missing_ok=True)
        return [s.name for s in servers]

    def save_layer(self, server: SandboxServer, destination: Path) -> None:
        """Power the server off and keep what it changed as a layer new servers boot from
        (e.g. a provisioned server: tests then skip provisioning). Removes the server."""
        if processes.is_ours(server.nspawn_pid, server.nspawn_marker):
            os.kill(server.nspawn_pid, signal.SIGTERM)
            if not processes.wait_gone([server.nspawn_pid], SHUTDOWN_GRACE_S):
                self._kill_container(server)
        saving = destination.with_name(destination.name + ".saving")
        shutil.rmtree(saving, ignore_errors=True)
        saving.parent.mkdir(parents=True, exist_ok=True)
        # cp -a keeps owners, modes and xattrs, overlay whiteouts and opaque folders included.
        _run(["cp", "-a", str(Path(server.root_dir).parent / "upper"), str(saving)])
        shutil.rmtree(destination, ignore_errors=True)
        saving.rename(destination)
        self._destroy(server)
        self._save([s for s in self.servers() if s.name != server.name])

    def is_healthy(self, server: SandboxServer) -> bool:
        return (processes.is_ours(server.nspawn_pid, server.nspawn_marker)
                and _ssh_banner(server.ssh_port, timeout=2.0))

    # -- internals ----------------------------------------------------------------------------
    @property
    def deploy_key_file(self) -> Path:
        """The deploy user's key for sandbox servers (installed by `doit setup`)."""
        return self.cache_dir / "keys" / "deploy_ed25519"

    def _ensure_key(self) -> None:
        self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.key_file.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs share these keys
            for key_file, comment in ((self.key_file, "sandbox-admin"),
                                      (self.deploy_key_file, "sandbox-deploy")):
                if not key_file.exists():
                    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                    comment, "-f", str(key_file)], check=True)

    def _plan(self, names: list[str], kept: list[SandboxServer]) -> list[SandboxServer]:
        taken = {p for s in kept for p in (s.ssh_port, s.http_port)}
        planned = []
        for name in names:
            offset = _index(name) - 1
            ssh_port = _free_port(_offset(self.preferred_ssh_port, offset), taken)
            taken.add(ssh_port)
            http_port = _free_port(_offset(self.preferred_http_port, offset), taken)
            taken.add(http_port)
            root_dir = self.state_dir / "servers" / name / "root"
            planned.append(SandboxServer(name, ssh_port, http_port, str(root_dir),
                                         inside_ssh_port=self.inside_ssh_port, ipv6=self.ipv6))
        return planned

    def _boot_or_clean(self, server: SandboxServer, lower: str) -> SandboxServer | Exception:
        """Boot one server; on failure remove whatever it had started and return the error."""
        try:
            return self._boot(server, lower)
        except Exception as error:  # noqa: BLE001 - reported after the other boots finish
            self._destroy(server)
            return error

    def _boot(self, server: SandboxServer, lower: str) -> SandboxServer:
        started = time.monotonic()
        server_dir = Path(server.root_dir).parent
        shutil.rmtree(server_dir, ignore_errors=True)
        for sub in ("upper", "work", "root"):
            (server_dir / sub).mkdir(parents=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={lower},upperdir={server_dir / 'upper'},workdir={server_dir / 'work'}",
              server.root_dir])
        self._personalise(server)
        apt_archives = self.cache_dir / "apt-archives"
        (apt_archives / "partial").mkdir(parents=True, exist_ok=True)
        nspawn = ["systemd-nspawn", "-D", server.root_dir, "-b", f"--machine={server.name}",
                  "--register=no", "--keep-unit", "--private-network", "--console=passive",
                  f"--bind={apt_archives}:/var/cache/apt/archives"]
        server.nspawn_pid = processes.spawn_detached(
            in_own_cgroups(server.name, nspawn), server_dir / "console.log")
        server.init_pid = self._wait_for_init(server)
        self._wait_until_booted(server)
        self._start_helpers(server)
        if not _wait_for_ssh(server.ssh_port, timeout=15):
            raise ToolkitError(f"sandbox: {server.name} booted but SSH on 127.0.0.1:"
                               f"{server.ssh_port} never answered; see {server_dir}/console.log")
        self.log(f"sandbox: {server.name} booted in {time.monotonic() - started:.1f} s")
        return server

    def _personalise(self, server: SandboxServer) -> None:
        root = Path(server.root_dir)
        (root / "etc/hostname").write_text(server.name + "\n")
        (root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{server.name}\n"
                                        f"::1\tlocalhost ip6-localhost ip6-loopback\n")
        for host_key in (root / "etc/ssh").glob("ssh_host_*"):  # from a provisioned layer
            host_key.unlink()
        _run(["chroot", str(root), "ssh-keygen", "-A"])
        server.host_key = " ".join(
            (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])
        public_key = Path(f"{self.key_file}.pub").read_text()
        if server.inside_ssh_port != 22:
            (root / "etc/ssh/sshd_config.d/05-sandbox-port.conf").write_text(
                f"Port {server.inside_ssh_port}\n")
        for home, owner in ((root / "root", "root"), (root / "home" / ADMIN_USER, ADMIN_USER)):
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            (ssh_dir / "authorized_keys").write_text(public_key)
            (ssh_dir / "authorized_keys").chmod(0o600)
            _run(["chroot", str(root), "chown", "-R", f"{owner}:{owner}",
                  str(Path("/") / ssh_dir.relative_to(root))])

    def _wait_for_init(self, server: SandboxServer) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and processes.alive(server.nspawn_pid):
            child = processes.first_child(server.nspawn_pid)
            # Before its exec the child is a copy of nspawn; after it, the container's systemd.
            if child and processes.cmdline(child)[:1] in (["/usr/lib/systemd/systemd"],
                                                          ["/lib/systemd/systemd"], ["/sbin/init"]):
                return child
            time.sleep(0.05)
        raise ToolkitError(f"sandbox: systemd-nspawn for {server.name} did not start systemd; see "
                           f"{Path(server.root_dir).parent}/console.log")

    def _wait_until_booted(self, server: SandboxServer) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        state = ""
        # Until the container's systemd has its bus up, systemctl answers "offline": ask again.
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            result = subprocess.run(
                ["timeout", str(BOOT_TIMEOUT_S), "nsenter", "-t", str(server.init_pid), "-a",
                 "systemctl", "is-system-running", "--wait"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            state = result.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.1)
        if state not in ("running", "degraded"):
            raise ToolkitError(f"sandbox: {server.name} did not finish booting (state {state!r}); "
                               f"see {Path(server.root_dir).parent}/console.log")

    def _start_helpers(self, server: SandboxServer) -> None:
        log_file = Path(server.root_dir).parent / "helpers.log"
        into_server = f"nsenter -t {server.init_pid} -n socat STDIO"
        # Web requests arrive from 127.0.0.2, as from outside: nginx tells the server's own
        # requests (127.0.0.1, which maintenance mode lets through) from the public's.
        forwards = [(server.ssh_port, server.inside_ssh_port, ""),
                    (server.http_port, 80, "\\,bind=127.0.0.2")]
        listens = ["TCP-LISTEN:{},bind=127.0.0.1"] + (["TCP6-LISTEN:{},bind=[::1]"]
                                                      if server.ipv6 else [])
        # nodelay on both TCP legs: sshd and ssh set TCP_NODELAY on their sockets, so a real
        # server answers at once; a relay holding a reply's second packet for the first one's
        # delayed ACK would add ~40 ms to a shell command that a real server does not.
        for host_port, server_port, source in forwards:
            for listen in (form.format(host_port) for form in listens):
                pid = processes.spawn_detached(
                    ["socat", f"{listen},fork,reuseaddr,nodelay",
                     f"EXEC:{into_server} TCP\\:127.0.0.1\\:{server_port}\\,nodelay{source}"],
                    log_file)
                server.helpers.append(Helper(pid, listen))
        # apt inside the server: a proxy port on its loopback, bridged to the mirror from the
        # host's network namespace (the nspawn process lives there).
        listen = f"TCP-LISTEN:{APT_PROXY_PORT},bind=127.0.0.1"
        pid = processes.spawn_detached(
            ["nsenter", "-t", str(server.init_pid), "-n", "socat", f"{listen},fork,reuseaddr",
             f"EXEC:nsenter --net=/proc/{server.nspawn_pid}/ns/net socat STDIO "
             f"TCP\\:{self.mirror.host}\\:{self.mirror.port}"], log_file)
        # nsenter execs socat, so the marker is what socat's own command line holds.
        server.helpers.append(Helper(pid, f"--net=/proc/{server.nspawn_pid}/ns/net socat"))

    def _destroy(self, server: SandboxServer) -> None:
        if processes.is_ours(server.nspawn_pid, server.nspawn_marker):
            # nspawn turns SIGTERM into an orderly poweroff of the container.
            os.kill(server.nspawn_pid, signal.SIGTERM)
            if not processes.wait_gone([server.nspawn_pid], SHUTDOWN_GRACE_S):
                self._kill_container(server)
        for helper in server.helpers:
            processes.end_group(helper.pgid, helper.marker)
        _unmount(Path(server.root_dir))
        shutil.rmtree(Path(server.root_dir).parent, ignore_errors=True)
        remove_own_cgroups(server.name)

    def _kill_container(self, server: SandboxServer) -> None:
        # SIGKILL to the container's init ends its whole PID namespace; then nspawn exits.
        init_root = _readlink(f"/proc/{server.init_pid}/root")
        if init_root == server.root_dir:
            os.kill(server.init_pid, signal.SIGKILL)
        if processes.is_ours(server.nspawn_pid, server.nspawn_marker):
            os.kill(server.nspawn_pid, signal.SIGKILL)
        processes.wait_gone([server.nspawn_pid, server.init_pid], SHUTDOWN_GRACE_S)

    def _unmount_leftovers(self) -> None:
        """Overlays of servers the state file no longer knows (e.g. after a crash)."""
        servers_dir = str((self.state_dir / "servers").resolve())
        for mount_point in _mount_points():
            if mount_point.startswith(servers_dir + "/"):
                _unmount(Path(mount_point))


# With --keep-unit and no systemd on the host, nspawn puts each container's systemd in
# "<its own cgroup>/payload": started from one cgroup, every container would share one tree,
# and their systemds would remove each other's unit cgroups (units then fail, 219/CGROUP).
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
CGROUP_PARENT = "flask-deploy-sandbox"


def _own_cgroups(name: str) -> list[Path]:
    return [root / CGROUP_PARENT / name for root in CGROUP_ROOTS
            if (root / "cgroup.procs").exists()]


def in_own_cgroups(name: str, argv: list[str]) -> list[str]:
    """argv, started from a cgroup of its own in each hierarchy that systemd uses."""
    groups = _own_cgroups(name)
    if not groups:
        return argv
    for group in groups:
        group.mkdir(parents=True, exist_ok=True)
    moves = "; ".join(f"echo $$ > {group}/cgroup.procs" for group in groups)
    return ["sh", "-c", f'{moves}; exec "$@"', "nspawn-in-cgroup", *argv]


def remove_own_cgroups(name: str) -> None:
    """Empty cgroups left by a stopped container, deepest first."""
    for group in _own_cgroups(name):
        if not group.exists():
            continue
        for folder in sorted((p for p in group.rglob("*") if p.is_dir()),
                             key=lambda p: len(p.parts), reverse=True) + [group]:
            try:
                folder.rmdir()
            except OSError:
                pass


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _offset(port: int | None, offset: int) -> int | None:
    return None if port is None else port + offset


def _free_port(preferred: int | None, taken: set[int]) -> int:
    candidates = [preferred] if preferred and preferred not in taken else []
    for port in candidates + [0] * 20:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen = probe.getsockname()[1]
        if chosen not in taken:
            return chosen
    raise ToolkitError("sandbox: found no free port on 127.0.0.1")


def _ssh_banner(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _wait_for_ssh(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ssh_banner(port, timeout=2.0):
            return True
        time.sleep(0.1)
    return False


def _mount_points() -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1].replace("\\040", " ") for line in mounts]


def _unmount(mount_point: Path) -> None:
    if str(mount_point.resolve()) not in _mount_points():
        return
    if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
        # Still busy (a process we did not start holds it): detach it so no mount is left visible.
        _run(["umount", "--lazy", str(mount_point)])


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ToolkitError(f"sandbox: `{' '.join(argv)}` failed: {result.stderr.strip()}")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
