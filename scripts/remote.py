"""The one place that opens SSH connections (plumbum SshMachine), always with host-key checking.

Every ssh reads the toolkit's config file (scripts.ssh_config): its rules, then the user's SSH
configuration, so a `Host` alias with its HostName, Port, User, IdentityFile and ProxyJump works
as it does for plain `ssh`. plumbum's SshMachine connects in its constructor, so call `connect`
only inside actions."""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.ssh_config import (CONNECT_TIMEOUT_S, SshView, config_file, describe_config,
                                private_dir)

# plumbum is imported where a session or machine is made, not here: its import takes ~0.1 s
# (and runs `uname -p`), which the run spends while the master's handshake is under way
# (MASTERS.start) instead of before it.

# A master left by a run that was killed ends by itself after this long without a session.
MASTER_IDLE_S = 10
# A master started or checked this recently still runs: the next session skips `ssh -O check`
# (a round trip). Were it gone after all, ssh itself falls back to a connection of its own.
MASTER_CHECKED_S = 1.0
# At exit, how long a handshake still under way (a run that failed before its first session)
# may finish, so that it ends as a login and `ssh -O exit`, not as a connection cut mid-login.
HANDSHAKE_AT_EXIT_S = 3
# plumbum logs a shell that did not start in time as "Connection to <Popen: ...> timed out";
# open_session says it in one line of its own.
logging.getLogger("plumbum.shell").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Target:
    """One server as the toolkit reaches it: `host` is what ssh is given (an address, or an
    alias of the SSH configuration), `port` and `user` what it will use there."""
    host: str
    port: int
    user: str
    key_file: Path | None = None
    known_hosts_file: Path | None = None
    name: str = ""  # how output names the server (sandbox name, or the entry as written)
    ssh_config: Path | None = None  # SSH_CONFIG; None: ssh's own
    view: SshView | None = None  # what `ssh -G` said about host, for DEPLOY_SERVER entries
    key_setting: str = "SSH_KEY_FILE"  # the setting that names key_file, for error lines

    @property
    def address(self) -> str:
        """Where ssh really connects: the HostName behind an alias."""
        return self.view.hostname if self.view else self.host

    @property
    def jump(self) -> str:
        return self.view.proxy_jump if self.view else ""

    def reached(self) -> str:
        """user@address:port, and the bastion it goes through."""
        via = f" via {self.jump}" if self.jump else ""
        return f"{self.user}@{self.address}:{self.port}{via}"

    def label(self) -> str:
        if self.address != self.host:  # name the alias, then where it leads
            return f"{self.host} ({self.reached()})"
        return self.reached()

    @property
    def display(self) -> str:
        return self.name or self.host


def ssh_options(target: Target) -> list[str]:
    """Options of every connection: the toolkit's config file (strict host keys on every hop, no
    prompts, bounded waits, then the user's SSH configuration)."""
    options = ["-F", str(config_file(target.ssh_config, target.known_hosts_file))]
    if target.key_file is not None:
        options += ["-o", "IdentitiesOnly=yes"]
    return options


@functools.lru_cache(maxsize=None)
def check_key_file(key_file: Path, setting: str = "SSH_KEY_FILE") -> None:
    """Say what is wrong with a private key before ssh hides it behind "Permission denied"."""
    if not key_file.is_file():
        raise ToolkitError(f"setting {setting}: {key_file} does not exist")
    probe = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key_file)],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        return
    if "passphrase" in probe.stderr:
        if os.environ.get("SSH_AUTH_SOCK"):
            return  # ssh-agent may hold it unlocked
        raise ToolkitError(f"setting {setting}: {key_file} is protected by a passphrase and "
                           f"no ssh-agent is running; start one and `ssh-add` the key")
    raise ToolkitError(f"setting {setting}: {key_file} is not a usable private key "
                       f"(malformed); point it at the private half of the key")


def connect(target: Target):
    """An open plumbum SshMachine, or a ToolkitError that says in one line what went wrong."""
    from plumbum import SshMachine
    from plumbum.commands.processes import ProcessExecutionError

    if target.key_file is not None:
        check_key_file(Path(target.key_file), target.key_setting)
    try:
        return SshMachine(target.host, user=target.user, port=target.port,
                          keyfile=str(target.key_file) if target.key_file else None,
                          ssh_opts=ssh_options(target), scp_opts=ssh_options(target),
                          connect_timeout=CONNECT_TIMEOUT_S)
    except (ProcessExecutionError, EOFError, OSError) as error:
        raise connection_failed(target, error) from None


class _Masters:
    """One SSH connection per server for a whole run: the first session to a server starts an
    OpenSSH master (`ssh -M -N` with ControlPersist: once the server let it in, it listens on a
    control socket in the run's private 0700 folder and goes to the background), and every
    later session of the run (check, ship, verify, a rollback, a reconnect) is multiplexed
    over it: no second handshake. The master verified the host key strictly when it
    connected; only this user can reach its socket. At exit each master is closed with
    `ssh -O exit`; one whose run was killed ends by itself after MASTER_IDLE_S without a
    session.

    An action that knows its servers calls `start` first: the handshake then runs while the
    action loads its modules and reads its files, and the first session waits only for what
    is left of it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.Lock] = {}
        self._started: set[Path] = set()
        self._starting: dict[Path, subprocess.Popen] = {}  # handshakes under way (start)
        self._checked: dict[Path, float] = {}  # when each master was last seen running

    @staticmethod
    def _socket(target: Target) -> Path:
        key = "\0".join(map(str, (ssh_options(target), target.host, target.port, target.user,
                                  target.key_file)))
        return private_dir() / f"m-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def _lock(self, socket: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(socket, threading.Lock())

    def start(self, target: Target) -> None:
        """Begin the target's handshake in the background, unless its master runs or starts
        already. Nothing is reported here: a problem is socket_for's to say, in its words
        (the key file is checked there too, while this handshake runs)."""
        try:
            socket = self._socket(target)
            lock = self._lock(socket)
            if not lock.acquire(blocking=False):
                return  # a session is connecting it now
            try:
                with self._guard:
                    under_way = socket in self._starting
                if not under_way and not (socket in self._started and socket.exists()):
                    process = self._launch(target, socket)
                    with self._guard:
                        self._starting[socket] = process
            finally:
                lock.release()
        except (ToolkitError, OSError):
            return

    def socket_for(self, target: Target) -> Path:
        """The control socket of the target's master, started if needed; a ToolkitError in
        ssh's own words (see connection_failed) if it cannot connect."""
        if target.key_file is not None:
            check_key_file(Path(target.key_file), target.key_setting)
        socket = self._socket(target)
        with self._lock(socket):  # servers connect in parallel; each server's master starts once
            with self._guard:
                process = self._starting.pop(socket, None)
            if process is None:
                if socket in self._started and self._runs(socket):
                    return socket
                process = self._launch(target, socket)
            # It returns once the master listens, in the background (or failed).
            if _wait(process, CONNECT_TIMEOUT_S + 5) == 0 and socket.exists():
                self._checked[socket] = time.monotonic()
                return socket
            # As for any failed connection: ssh's words from one plain attempt (the master's
            # own stderr is terser through a bastion), else the master's.
            said = _errors_file(socket).read_text() or \
                "Connection timed out during banner exchange"
            raise connection_failed(target, RuntimeError(said))

    def _launch(self, target: Target, socket: Path) -> subprocess.Popen:
        with self._guard:
            if not self._started:
                atexit.register(self.close_all)
            self._started.add(socket)
        socket.unlink(missing_ok=True)  # a master that died (a cut link) left its socket
        # A file, not a pipe: the master keeps its stderr once in the background.
        with open(_errors_file(socket), "w") as errors:
            return subprocess.Popen(
                ssh_argv(target, "-M", "-N", "-S", str(socket), "-o",
                         f"ControlPersist={MASTER_IDLE_S}"),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)

    def _runs(self, socket: Path) -> bool:
        if not socket.exists():
            return False
        if time.monotonic() - self._checked.get(socket, float("-inf")) < MASTER_CHECKED_S:
            return True
        if not self._control(socket, "check"):
            return False
        self._checked[socket] = time.monotonic()
        return True

    @staticmethod
    def _control(socket: Path, command: str) -> bool:
        try:
            return subprocess.run(["ssh", "-S", str(socket), "-O", command, "flask-deploy"],
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def close_all(self) -> None:
        """End every master of this run (at exit; tests may call it to check nothing stays)."""
        with self._guard:
            started, self._started = set(self._started), set()
            starting, self._starting = dict(self._starting), {}
        for process in starting.values():  # let a login under way finish, then end it
            _wait(process, HANDSHAKE_AT_EXIT_S)
        for socket in started:
            if socket.exists():
                self._control(socket, "exit")


def _errors_file(socket: Path) -> Path:
    return socket.with_name(socket.name + ".errors")


def _wait(process: subprocess.Popen, timeout: float) -> int | None:
    """The exit status, or None once `timeout` passed (the process is then killed; so it is
    when the wait is interrupted). A blocking wait: subprocess's own timed wait polls in
    sleeps of up to 50 ms, which every connection would pay on top of its handshake."""
    expired = threading.Event()

    def expire():
        expired.set()
        process.kill()
    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        status = process.wait()
    except BaseException:  # Ctrl-C: as subprocess.run, never leave the ssh behind
        process.kill()
        process.wait()
        raise
    finally:
        timer.cancel()
    return None if expired.is_set() else status


MASTERS = _Masters()


def begin_connecting(targets: list[Target], limit: int) -> None:
    """Start the handshakes of the first `limit` servers (DEPLOY_PARALLEL: those that connect
    first), so that they run while the task gets ready; see _Masters. The first session needs
    plumbum: it is loaded now, while they run."""
    for target in targets[:limit]:
        MASTERS.start(target)
    import plumbum.machines.session  # noqa: F401


def open_session(target: Target):
    """A plumbum ShellSession for the deploy steps, over the run's one connection to the
    server (see _Masters)."""
    from plumbum.machines.session import ShellSession, ShellSessionError

    socket = MASTERS.socket_for(target)
    process = subprocess.Popen([*ssh_argv(target, "-T", "-S", str(socket), "-o",
                                          "ControlMaster=no"), "/bin/sh"],
                               stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        return ShellSession(process, "utf8", False, CONNECT_TIMEOUT_S, host=target.host)
    # SSHCommsError is an EOFError; ValueError: no prompt within CONNECT_TIMEOUT_S (plumbum
    # closes the pipes the session reads from), as over a master whose link was cut.
    except (ShellSessionError, EOFError, OSError, ValueError) as error:
        process.kill()
        process.wait()
        raise connection_failed(target, error) from None


def open_channel(target: Target, command: str) -> subprocess.Popen:
    """COMMAND on the server with its stdin and stdout as pipes (stderr dropped), over the
    run's one connection (see _Masters): opening it costs no handshake."""
    socket = MASTERS.socket_for(target)
    return subprocess.Popen([*ssh_argv(target, "-T", "-S", str(socket), "-o",
                                       "ControlMaster=no"), command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def connection_failed(target: Target, error: BaseException) -> ToolkitError:
    """What went wrong, in ssh's own words: plumbum keeps only the start of ssh's complaint, or
    none at all when ssh exits before the first command (a bare broken pipe), so ask ssh again."""
    stderr = _ssh_diagnosis(target) or str(getattr(error, "stderr", "") or error)
    return ToolkitError(explain_ssh_failure(target, stderr))


def ssh_argv(target: Target, *extra: str) -> list[str]:
    argv = ["ssh", *ssh_options(target), *extra, "-p", str(target.port)]
    if target.key_file is not None:
        argv += ["-i", str(target.key_file)]
    return [*argv, f"{target.user}@{target.host}"]


def _ssh_diagnosis(target: Target) -> str:
    argv = [*ssh_argv(target), "true"]
    try:
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=CONNECT_TIMEOUT_S + 5).stderr
    except subprocess.TimeoutExpired:
        return "Connection timed out during banner exchange"


def explain_ssh_failure(target: Target, stderr: str) -> str:
    """ssh's own words, turned into what to check."""
    where = f"SSH to {target.label()}"
    view = target.view
    config = describe_config(target.ssh_config)
    known_hosts = target.known_hosts_file or \
        (view.known_hosts_files[0] if view and view.known_hosts_files else "~/.ssh/known_hosts")
    if target.key_file:
        key, key_setting = f"the key {target.key_file}", target.key_setting
    elif view:
        key, key_setting = "the keys ssh offered", f"IdentityFile of {target.host} in {config}, " \
                                                   f"or {target.key_setting}"
    else:
        key, key_setting = "the keys of ssh-agent", target.key_setting
    port_setting = f"Port of {target.host} in {config}, or SSH_PORT" \
        if view and "port" in view.from_config else "SSH_PORT"
    bastion = f" (or the bastion {target.jump})" if target.jump else ""
    bastions = f" (or the bastion {target.jump}'s)" if target.jump else ""
    if "IDENTIFICATION HAS CHANGED" in stderr or "has changed" in stderr:
        return (f"{where}: the server's host key{bastions} CHANGED since it was recorded in "
                f"{known_hosts}; if the server was really reinstalled, verify its new fingerprint "
                f"and replace the entry, else stop: someone may be in between")
    if "host key is known" in stderr or "Host key verification failed" in stderr:
        return (f"{where}: its host key{bastions} is not in {known_hosts}; check its fingerprint, "
                f"then add it with `ssh-keyscan -p {target.port} {target.address} >> "
                f"{known_hosts}` (SSH_KNOWN_HOSTS_FILE / SSH_KNOWN_HOSTS)")
    if "Load key" in stderr or "invalid format" in stderr or "passphrase" in stderr:
        return (f"{where}: {key} cannot be used (malformed, or protected by a passphrase with no "
                f"ssh-agent holding it); check {key_setting}")
    if "Permission denied" in stderr and target.key_setting != "SSH_KEY_FILE":
        return (f"{where}: the server refused {key}; set {target.key_setting} to "
                f"{target.user}'s own key (or load it into ssh-agent). Never give {target.user} "
                f"the deploy key: it would open more than the deploy user")
    if "Permission denied" in stderr:
        return (f"{where}: the server{bastion} refused {key}; check {key_setting}, and that its "
                f"public key is in ~{target.user}/.ssh/authorized_keys (`doit setup` installs it)")
    if "open failed" in stderr or "stdio forwarding failed" in stderr:
        reason = next((line.split("open failed:")[-1].strip() for line in stderr.splitlines()
                       if "open failed" in line), "the forwarding failed")
        return (f"{where}: the bastion {target.jump or 'of ProxyJump'} cannot reach "
                f"{target.address}:{target.port} ({reason}); check HostName and Port of "
                f"{target.host} in {config}")
    if "Connection refused" in stderr and target.jump:  # the target's own refusal is above
        return (f"{where}: the bastion {target.jump} refused the connection; is it up, with SSH "
                f"on the port its entry in {config} names?")
    if "Connection refused" in stderr:
        return (f"{where}: connection refused; is the server up, with SSH on port {target.port} "
                f"({port_setting})?")
    if "timed out" in stderr or "Operation timed out" in stderr:
        return (f"{where}: no answer within {CONNECT_TIMEOUT_S} s; check DEPLOY_SERVER, "
                f"{port_setting} and the firewall")
    if "Could not resolve hostname" in stderr:
        if view and not view.is_alias:
            return (f"SSH to {target.host}: {target.host} is neither a Host of the SSH "
                    f"configuration ({config}) nor a name that resolves; add `Host {target.host}` "
                    f"with its HostName there (SSH_CONFIG names another file), or correct "
                    f"DEPLOY_SERVER")
        if view:
            return (f"{where}: cannot resolve {target.address}, the HostName of {target.host} in "
                    f"{config}; correct it there")
        return f"{where}: cannot resolve {target.host}; check DEPLOY_SERVER"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error text"
    return f"{where} failed: {last}"
