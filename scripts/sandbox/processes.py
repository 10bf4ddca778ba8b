"""Start helper processes in their own process group, and end exactly those, by PID.

A PID is checked against what we recorded (its command line) before any signal is sent, so a PID
reused by an unrelated process after a reboot or a crash is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def spawn_detached(argv: list[str], log_file: Path) -> int:
    """Start argv in a new session (its PID is also its process group id) and return the PID."""
    with open(log_file, "ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True, close_fds=True)
    return process.pid


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def alive(pid: int) -> bool:
    return pid > 0 and Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def is_ours(pid: int, marker: str) -> bool:
    """True when pid is alive and its command line contains marker (what we started it with)."""
    return pid > 0 and marker in " ".join(cmdline(pid))


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is pgid (socat forks one child per connection into it)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def end_group(pgid: int, marker: str, grace: float = 3.0) -> None:
    """SIGTERM the group led by pgid if its members are ours, then SIGKILL what is left."""
    members = [pid for pid in group_members(pgid) if is_ours(pid, marker)]
    if not members:
        return
    _signal_group(pgid, signal.SIGTERM)
    if not wait_gone(members, grace):
        _signal_group(pgid, signal.SIGKILL)
        wait_gone(members, grace)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pids)
        if not any(Path(f"/proc/{pid}").exists() and not _is_zombie(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def _reap(pids: list[int]) -> None:
    """Collect exit statuses of our own children so they do not linger as zombies."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None
