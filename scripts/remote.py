"""The one place that opens SSH connections (plumbum SshMachine), always with host-key checking.

plumbum's SshMachine connects in its constructor, so call `connect` only inside actions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plumbum import SshMachine

CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Target:
    """One server as the toolkit reaches it."""
    host: str
    port: int
    user: str
    key_file: Path | None = None
    known_hosts_file: Path | None = None

    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


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


def connect(target: Target) -> SshMachine:
    return SshMachine(target.host, user=target.user, port=target.port,
                      keyfile=str(target.key_file) if target.key_file else None,
                      ssh_opts=ssh_options(target), scp_opts=ssh_options(target),
                      connect_timeout=CONNECT_TIMEOUT_S)
