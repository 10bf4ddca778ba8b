"""Local sandbox servers: real Debian 12 or 13 with systemd, booted with systemd-nspawn."""

from __future__ import annotations

from scripts.remote import Target
from scripts.sandbox.image import ADMIN_USER
from scripts.sandbox.servers import Sandbox, SandboxServer
from scripts.settings import Settings

# The demo sandbox keeps stable, memorable ports; test sandboxes take whatever is free.
DEMO_SSH_PORT = 2222
DEMO_HTTP_PORT = 8080


def sandbox_from_settings(settings: Settings, log=print) -> Sandbox:
    return Sandbox(settings.sandbox_dir, settings.sandbox_cache, settings.sandbox_mirror,
                   preferred_ssh_port=DEMO_SSH_PORT, preferred_http_port=DEMO_HTTP_PORT, log=log,
                   suite=settings.sandbox_suite)


def root_target(sandbox: Sandbox, server: SandboxServer) -> Target:
    """How to reach a sandbox server as root, with its generated key and known_hosts entry."""
    return Target(server.host, server.ssh_port, "root", sandbox.key_file, sandbox.known_hosts_file)


def describe(server: SandboxServer, sandbox: Sandbox) -> str:
    # admin, not root: a provisioned server refuses root logins (sshd hardening); admin has sudo.
    return (f"{server.name}: ssh -i {sandbox.key_file} -o UserKnownHostsFile="
            f"{sandbox.known_hosts_file} -p {server.ssh_port} {ADMIN_USER}@127.0.0.1   "
            f"http: {server.url}")


__all__ = ["Sandbox", "SandboxServer", "sandbox_from_settings", "root_target", "describe"]
