"""Which servers a task acts on, and as whom: from DEPLOY_SERVER, or the local sandbox.

An entry may be an alias of the user's SSH configuration (`Host prod`): what the entry and the
settings the user gave leave open (port, user, key, known_hosts, ProxyJump) is what ssh itself
would use for it, as `ssh -G` tells."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.remote import Target
from scripts.settings import Settings, split_host
from scripts.ssh_config import resolve

SANDBOX_SETUP_USER = "admin"


def _sandbox(settings: Settings):
    from scripts.sandbox import sandbox_from_settings

    sandbox = sandbox_from_settings(settings)
    servers = sandbox.servers()
    if not servers:
        raise ToolkitError("DEPLOY_SERVER is unset, so tasks target the local sandbox, but no "
                           "sandbox server runs; start one with `doit sandbox` (or set "
                           "DEPLOY_SERVER)")
    return sandbox, servers


def deploy_targets(settings: Settings) -> list[Target]:
    """The deploy user on every server."""
    if settings.uses_sandbox:
        sandbox, servers = _sandbox(settings)
        key = settings.ssh_key_file or sandbox.deploy_key_file
        return [Target(s.host, s.ssh_port, settings.deploy_user, key, sandbox.known_hosts_file,
                       name=s.name, ssh_config=settings.ssh_config) for s in servers]
    user = settings.deploy_user if "DEPLOY_USER" in settings.given else None
    return _each(lambda entry: _target(entry, settings, user, fallback_user=settings.deploy_user),
                 settings.deploy_servers)


def _each(make, entries) -> list:
    """make(entry) for every entry, side by side: each asks `ssh -G` (~15 ms a process). The
    first entry that fails raises, as one after another would."""
    if len(entries) < 2:
        return [make(entry) for entry in entries]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
        return list(pool.map(make, entries))


def _target(entry: str, settings: Settings, user: str | None, fallback_user: str = "") -> Target:
    """An entry `[user@]host[:port]`: what it says wins, then the settings the user gave, then
    the SSH configuration, then the defaults."""
    entry_user, host, entry_port = split_host(entry)
    if entry_port:
        port = int(entry_port)
    else:
        port = settings.ssh_port if "SSH_PORT" in settings.given else None
    view = resolve(host, port, entry_user or user, settings.ssh_config,
                   settings.ssh_known_hosts_file, fallback_user)
    return Target(host, view.port, view.user, settings.ssh_key_file,
                  settings.ssh_known_hosts_file, name=host if not entry_port else f"{host}:{port}",
                  ssh_config=settings.ssh_config, view=view)


def setup_targets(settings: Settings) -> list[Target]:
    """The provisioning account (with sudo) on every server."""
    if settings.uses_sandbox:
        sandbox, servers = _sandbox(settings)
        user = settings.setup_user or SANDBOX_SETUP_USER
        key = settings.setup_key_file or sandbox.key_file
        return [Target(s.host, s.ssh_port, user, key, sandbox.known_hosts_file, name=s.name,
                       ssh_config=settings.ssh_config, key_setting="SETUP_KEY_FILE")
                for s in servers]
    user = settings.setup_user or "root"
    if settings.ssh_key_file and settings.setup_key_file == settings.ssh_key_file:
        raise ToolkitError("setting SETUP_KEY_FILE is the deploy key (SSH_KEY_FILE): the account "
                           f"that provisions ({user}) logs in with its own key, so the deploy key "
                           "never opens more than the deploy user; use another key, or ssh-agent")
    # The entry's user is the deploy user; setup always logs in as SETUP_USER, with its own key
    # (SETUP_KEY_FILE, else ssh-agent or the entry's IdentityFile), never the deploy key.
    return _each(lambda entry: replace(_target(f"{user}@{entry.rpartition('@')[2]}", settings,
                                               user),
                                       key_file=settings.setup_key_file,
                                       key_setting="SETUP_KEY_FILE"),
                 settings.deploy_servers)


def deploy_public_key(settings: Settings, target: Target | None = None) -> str:
    """The public key `doit setup` installs for the deploy user on target, checked to be one."""
    view = target.view if target else None
    if settings.deploy_public_key_file:
        path = settings.deploy_public_key_file
        setting = "DEPLOY_PUBLIC_KEY_FILE"
    elif settings.ssh_key_file:
        path = Path(f"{settings.ssh_key_file}.pub")
        setting = "SSH_KEY_FILE (+ .pub)"
    elif view and view.own_identity_files:  # the key ssh offers this host, as for `ssh prod`
        path = Path(f"{view.own_identity_files[0]}.pub").expanduser()
        setting = f"IdentityFile of {view.alias} in the SSH configuration (+ .pub)"
    elif settings.uses_sandbox:
        from scripts.sandbox import sandbox_from_settings
        path = Path(f"{sandbox_from_settings(settings).deploy_key_file}.pub")
        setting = "the sandbox deploy key"
    else:
        raise ToolkitError("setting DEPLOY_PUBLIC_KEY_FILE (or SSH_KEY_FILE, or an IdentityFile "
                           "in the server's SSH configuration) is needed: `doit setup` installs "
                           "that public key for the deploy user")
    try:
        key = path.read_text().strip()
    except OSError:
        raise ToolkitError(f"{setting}: cannot read the public key {path}; create it with "
                           f"ssh-keygen (see README, SSH keys)") from None
    if not key.startswith(("ssh-", "ecdsa-", "sk-")) or "PRIVATE KEY" in key:
        raise ToolkitError(f"{setting}: {path} is not an SSH public key")
    return key
