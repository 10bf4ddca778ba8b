"""Which servers a task acts on, and as whom: from DEPLOY_SERVER, or the local sandbox."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.remote import Target
from scripts.settings import Settings, split_host

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
                       name=s.name) for s in servers]
    return [_target(entry, settings, settings.deploy_user) for entry in settings.deploy_servers]


def _target(entry: str, settings: Settings, default_user: str) -> Target:
    user, host, port = split_host(entry)
    port_number = int(port) if port else settings.ssh_port
    name = host if not port else f"{host}:{port}"
    return Target(host, port_number, user or default_user, settings.ssh_key_file,
                  settings.ssh_known_hosts_file, name=name)


def setup_targets(settings: Settings) -> list[Target]:
    """The provisioning account (with sudo) on every server."""
    if settings.uses_sandbox:
        sandbox, servers = _sandbox(settings)
        user = settings.setup_user or SANDBOX_SETUP_USER
        key = settings.setup_key_file or sandbox.key_file
        return [Target(s.host, s.ssh_port, user, key, sandbox.known_hosts_file, name=s.name,
                       key_setting="SETUP_KEY_FILE") for s in servers]
    user = settings.setup_user or "root"
    if settings.ssh_key_file and settings.setup_key_file == settings.ssh_key_file:
        raise ToolkitError("setting SETUP_KEY_FILE is the deploy key (SSH_KEY_FILE): the account "
                           f"that provisions ({user}) logs in with its own key, so the deploy key "
                           "never opens more than the deploy user; use another key, or ssh-agent")
    # The entry's user is the deploy user; setup always logs in as SETUP_USER, with its own key
    # (SETUP_KEY_FILE, else ssh-agent), never the deploy key.
    return [replace(_target(entry, settings, user), user=user, key_file=settings.setup_key_file,
                    key_setting="SETUP_KEY_FILE") for entry in settings.deploy_servers]


def deploy_public_key(settings: Settings) -> str:
    """The public key `doit setup` installs for the deploy user, checked to be one."""
    if settings.deploy_public_key_file:
        path = settings.deploy_public_key_file
        setting = "DEPLOY_PUBLIC_KEY_FILE"
    elif settings.ssh_key_file:
        path = Path(f"{settings.ssh_key_file}.pub")
        setting = "SSH_KEY_FILE (+ .pub)"
    elif settings.uses_sandbox:
        from scripts.sandbox import sandbox_from_settings
        path = Path(f"{sandbox_from_settings(settings).deploy_key_file}.pub")
        setting = "the sandbox deploy key"
    else:
        raise ToolkitError("setting DEPLOY_PUBLIC_KEY_FILE (or SSH_KEY_FILE) is needed: `doit "
                           "setup` installs that public key for the deploy user")
    try:
        key = path.read_text().strip()
    except OSError:
        raise ToolkitError(f"{setting}: cannot read the public key {path}; create it with "
                           f"ssh-keygen (see README, SSH keys)") from None
    if not key.startswith(("ssh-", "ecdsa-", "sk-")) or "PRIVATE KEY" in key:
        raise ToolkitError(f"{setting}: {path} is not an SSH public key")
    return key
