"""The one place that opens SSH connections (plumbum SshMachine), always with host-key checking.

plumbum's SshMachine connects in its constructor, so call `connect` only inside actions."""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from plumbum import SshMachine
from plumbum.commands.processes import ProcessExecutionError
from plumbum.machines.session import ShellSession, ShellSessionError

from scripts.errors import ToolkitError

CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Target:
    """One server as the toolkit reaches it."""
    host: str
    port: int
    user: str
    key_file: Path | None = None
    known_hosts_file: Path | None = None
    name: str = ""  # how output names the server (sandbox name or host)
    key_setting: str = "SSH_KEY_FILE"  # the setting that names key_file, for error lines

    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def display(self) -> str:
        return self.name or self.host


def ssh_options(target: Target) -> list[str]:
    """ssh -o options shared by every connection: strict host keys, no prompts, bounded waits."""
    options = ["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
               "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if target.known_hosts_file is not None:
        options += ["-o", f"UserKnownHostsFile={target.known_hosts_file}",
                    "-o", "GlobalKnownHostsFile=/dev/null"]
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


def connect(target: Target) -> SshMachine:
    """An open connection, or a ToolkitError that says in one line what went wrong."""
    if target.key_file is not None:
        check_key_file(Path(target.key_file), target.key_setting)
    try:
        return SshMachine(target.host, user=target.user, port=target.port,
                          keyfile=str(target.key_file) if target.key_file else None,
                          ssh_opts=ssh_options(target), scp_opts=ssh_options(target),
                          connect_timeout=CONNECT_TIMEOUT_S)
    except (ProcessExecutionError, EOFError, OSError) as error:
        raise connection_failed(target, error) from None


def open_session(target: Target) -> ShellSession:
    """A shell over one SSH connection, for the deploy steps. (SshMachine opens a connection of
    its own for bookkeeping, and a session on top would be a second handshake per server.)"""
    if target.key_file is not None:
        check_key_file(Path(target.key_file), target.key_setting)
    process = subprocess.Popen([*ssh_argv(target, "-T"), "/bin/sh"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        return ShellSession(process, "utf8", False, CONNECT_TIMEOUT_S, host=target.host)
    except (ShellSessionError, EOFError, OSError) as error:  # SSHCommsError is an EOFError
        process.kill()
        process.wait()
        raise connection_failed(target, error) from None


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
    known_hosts = target.known_hosts_file or "~/.ssh/known_hosts"
    key = target.key_file or "ssh-agent"
    if "IDENTIFICATION HAS CHANGED" in stderr or "has changed" in stderr:
        return (f"{where}: the server's host key CHANGED since it was recorded in {known_hosts}; "
                f"if the server was really reinstalled, verify its new fingerprint and replace "
                f"the entry, else stop: someone may be in between")
    if "host key is known" in stderr or "Host key verification failed" in stderr:
        return (f"{where}: its host key is not in {known_hosts}; check its fingerprint, then add "
                f"it with `ssh-keyscan -p {target.port} {target.host} >> {known_hosts}` "
                f"(SSH_KNOWN_HOSTS_FILE / SSH_KNOWN_HOSTS)")
    if "Load key" in stderr or "invalid format" in stderr or "passphrase" in stderr:
        return (f"{where}: the private key {key} cannot be used (malformed, or protected by a "
                f"passphrase with no ssh-agent holding it); check {target.key_setting}")
    if "Permission denied" in stderr and target.key_setting != "SSH_KEY_FILE":
        return (f"{where}: the server refused the key {key}; set {target.key_setting} to "
                f"{target.user}'s own key (or load it into ssh-agent). Never give {target.user} "
                f"the deploy key: it would open more than the deploy user")
    if "Permission denied" in stderr:
        return (f"{where}: the server refused the key {key}; check SSH_KEY_FILE and that its "
                f"public key is in ~{target.user}/.ssh/authorized_keys (`doit setup` installs it)")
    if "Connection refused" in stderr:
        return (f"{where}: connection refused; is the server up, with SSH on port {target.port} "
                f"(SSH_PORT)?")
    if "timed out" in stderr or "Operation timed out" in stderr:
        return (f"{where}: no answer within {CONNECT_TIMEOUT_S} s; check DEPLOY_SERVER, SSH_PORT "
                f"and the firewall")
    if "Could not resolve hostname" in stderr:
        return f"{where}: cannot resolve {target.host}; check DEPLOY_SERVER"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error text"
    return f"{where} failed: {last}"
