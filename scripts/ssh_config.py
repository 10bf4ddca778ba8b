"""The user's OpenSSH configuration, as OpenSSH itself reads it.

Every ssh the toolkit starts reads one small config file written here: the toolkit's rules first
(ssh keeps the first value it reads, so they win), then the user's own configuration. Being a
file passed with -F rather than -o options, those rules also bind the ssh that ProxyJump starts
for a bastion (ssh hands -F on to it): host keys are checked and nothing prompts on every hop.

What ssh will use for a host (HostName, Port, User, IdentityFile, ProxyJump) is asked of
`ssh -G`, never parsed here."""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from scripts.errors import ToolkitError

CONNECT_TIMEOUT_S = 10
# What plain `ssh` reads when not given -F (the user's file first, as ssh does).
DEFAULT_CONFIGS = ("~/.ssh/config", "/etc/ssh/ssh_config")
RULES = ("StrictHostKeyChecking yes",  # never trust an unknown host key, bastions included
         "BatchMode yes",              # never wait for a password or a yes/no at a prompt
         f"ConnectTimeout {CONNECT_TIMEOUT_S}",
         "ServerAliveInterval 5",
         "ServerAliveCountMax 3")


def describe_config(user_config: Path | None) -> str:
    """How messages name the SSH configuration."""
    return str(user_config) if user_config else "~/.ssh/config"


def config_text(user_config: Path | None, known_hosts_file: Path | None,
                fallback_user: str = "") -> str:
    lines = ["# Written by flask-deploy for this run: its rules, then your SSH configuration.",
             *RULES]
    if known_hosts_file is not None:  # SSH_KNOWN_HOSTS_FILE holds every hop's host key
        lines += [f'UserKnownHostsFile "{known_hosts_file}"', "GlobalKnownHostsFile /dev/null"]
    includes = [f'"{user_config}"'] if user_config else list(DEFAULT_CONFIGS)
    lines += [f"Include {path}" for path in includes]
    if fallback_user:  # read last: only where the configuration names no User
        lines += ["Host *", f"  User {fallback_user}"]
    return "\n".join(lines) + "\n"


# Servers connect from parallel threads; one of them writes the folder and each file.
_WRITING = threading.Lock()


@functools.lru_cache(maxsize=None)
def private_dir() -> Path:
    """This run's own folder (mode 0700): config files and SSH control sockets."""
    folder = Path(tempfile.mkdtemp(prefix="flask-deploy-ssh-"))  # 0700, ours alone
    atexit.register(shutil.rmtree, folder, True)
    return folder


def config_file(user_config: Path | None, known_hosts_file: Path | None,
                fallback_user: str = "") -> Path:
    """The -F file for these settings (written once per run)."""
    if user_config is not None and not user_config.is_file():
        # ssh would skip a missing Include without a word.
        raise ToolkitError(f"setting SSH_CONFIG: {user_config} does not exist; point it at your "
                           f"OpenSSH config file, or leave it unset for ~/.ssh/config")
    text = config_text(user_config, known_hosts_file, fallback_user)
    with _WRITING:
        path = private_dir() / f"config-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)
    return path


@dataclass(frozen=True)
class SshView:
    """What `ssh -G` says ssh will use for one host."""
    alias: str                      # as the user wrote it
    hostname: str                   # the address ssh connects to (HostName)
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts_files: tuple[str, ...]
    own_identity_files: tuple[str, ...] = ()  # those this host's entries name, not `Host *`
    proxy_jump: str = ""            # the bastion(s), as written in ProxyJump
    proxy_command: str = ""
    user_config: Path | None = None
    from_config: frozenset[str] = frozenset()  # "port", "user": not given by a setting

    @property
    def is_alias(self) -> bool:
        return self.hostname != self.alias

    @property
    def relayed(self) -> bool:
        """Reached through another machine, which resolves the HostName itself."""
        return bool(self.proxy_jump or self.proxy_command)


# A name no `Host` entry names: what ssh -G says for it is what catch-all entries say.
UNNAMED_HOST = "flask-deploy-unnamed-host.invalid"


@functools.lru_cache(maxsize=None)
def resolve(host: str, port: int | None, user: str | None, user_config: Path | None,
            known_hosts_file: Path | None, fallback_user: str) -> SshView:
    """What ssh will use for `host`; `port` and `user`, when given, override the configuration,
    and `fallback_user` applies where it names no User for this host. A User that only a
    catch-all entry (`Host *`) gives is a person's own login name, not the account that owns
    the releases, so it does not count."""
    if host == UNNAMED_HOST:
        return _ssh_g(host, port, user, user_config, known_hosts_file, fallback_user)
    # Both `ssh -G` at once: each is a process start of ~15 ms.
    with ThreadPoolExecutor(max_workers=1) as pool:
        asked = pool.submit(resolve, UNNAMED_HOST, None, None, user_config, known_hosts_file,
                            fallback_user)
        view = _ssh_g(host, port, user, user_config, known_hosts_file, fallback_user)
        catch_all = asked.result()
    own_keys = tuple(key for key in view.identity_files if key not in catch_all.identity_files)
    view = replace(view, own_identity_files=own_keys)
    if user is None and fallback_user and view.user == catch_all.user:
        view = replace(view, user=fallback_user)
    return view


def _ssh_g(host: str, port: int | None, user: str | None, user_config: Path | None,
           known_hosts_file: Path | None, fallback_user: str) -> SshView:
    argv = ["ssh", "-F", str(config_file(user_config, known_hosts_file, fallback_user)), "-G"]
    if port is not None:
        argv += ["-p", str(port)]
    if user is not None:
        argv += ["-l", user]
    result = subprocess.run([*argv, host], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=30)
    if result.returncode != 0:
        complaint = (result.stderr.strip().splitlines() or ["no error text"])[-1]
        raise ToolkitError(f"SSH configuration {describe_config(user_config)}: ssh cannot read it "
                           f"for {host}: {complaint}")
    options: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key.lower(), []).append(value)

    def first(key: str, default: str = "") -> str:
        value = options.get(key, [default])[0]
        return "" if value == "none" else value
    return SshView(alias=host, hostname=first("hostname", host), port=int(first("port", "22")),
                   user=first("user"), identity_files=tuple(options.get("identityfile", [])),
                   known_hosts_files=tuple(first("userknownhostsfile").split()),
                   proxy_jump=first("proxyjump"), proxy_command=first("proxycommand"),
                   user_config=user_config,
                   from_config=frozenset(name for name, given in (("port", port), ("user", user))
                                         if given is None))
