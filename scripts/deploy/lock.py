"""The deploy lock on a server: taken atomically (mkdir), records who, when and what, released
on every exit (Ctrl-C and SIGTERM included). A lock left by a deploy that died on this machine
is recognised safely (its process is gone, or this machine has booted since) and broken; any
other is reported with its holder. "This machine" is its machine-id, not its host name: two
laptops called `debian` never break each other's live lock."""

from __future__ import annotations

import datetime
import getpass
import json
import os
import secrets
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from scripts.errors import ToolkitError


class Interrupted(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so `finally` blocks run."""


def who() -> str:
    user = os.environ.get("GITLAB_USER_LOGIN") or os.environ.get("GITHUB_ACTOR") or \
        getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def machine_identity() -> dict:
    """This machine (systemd's machine-id) and this boot of it (the kernel's boot id); empty
    strings where they cannot be read, and then no lock is ever judged dead."""
    identity = {}
    for key, file_name in (("machine_id", "/etc/machine-id"),
                           ("boot_id", "/proc/sys/kernel/random/boot_id")):
        try:
            identity[key] = Path(file_name).read_text().strip()
        except OSError:
            identity[key] = ""
    return identity


def process_start_time(pid: int) -> str:
    """Distinguishes a live process from a later one that reused its PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def lock_info(release: str, action: str) -> dict:
    return {"token": secrets.token_hex(8), "who": who(), "host": socket.gethostname(),
            **machine_identity(),
            "pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "release": release, "action": action}


def holder_is_dead(holder: dict) -> bool:
    """Only provable on the machine that holds it (same machine-id): that machine has booted
    since, or, in the same boot, that process is gone."""
    here = machine_identity()
    if not here["machine_id"] or holder.get("machine_id") != here["machine_id"]:
        return False
    if holder.get("boot_id") != here["boot_id"]:
        return bool(here["boot_id"])
    if not holder.get("pid"):
        return False
    return process_start_time(int(holder["pid"])) != holder.get("pid_start")


def describe(holder: dict) -> str:
    if not holder or "who" not in holder:
        return (holder or {}).get("holder", "an unknown holder")
    return (f"{holder['who']} (pid {holder.get('pid')}) since {holder.get('started')}, "
            f"{holder.get('action', 'deploy')} of release {holder.get('release')}")


@contextmanager
def sigterm_raises():
    """Turn SIGTERM into an exception for the duration, so the lock is released. Only the
    main thread can take signals; servers handled in worker threads rely on it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted("terminated")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deploy_lock(server, release: str, action: str = "deploy", log=print,
                package: tuple[str, str] = ()):
    """Yields the lock's info; with `package` (name, sha256), its "package_present" says
    whether the server has that package already (asked in the same round trip)."""
    info = lock_info(release, action)
    path = str(server.deploy_path)
    answer = server.tool_call("lock", path, json.dumps(info), *package,
                              what="taking the deploy lock")
    present = answer.get("present") if package else None
    if not server.dry_run and not answer.get("taken"):
        holder = answer.get("holder") or {}
        if holder and "who" in holder and not holder.get("machine_id"):
            raise ToolkitError(f"{server.name}: the deploy lock was taken by an older version "
                               f"of this toolkit, which did not record its machine, so whether "
                               f"it died cannot be told: {describe(holder)}; if no deploy is "
                               f"running, run `doit unlock`")
        if not holder_is_dead(holder):
            raise ToolkitError(f"{server.name}: another deploy holds the lock: "
                               f"{describe(holder)}; wait for it, or if it died run "
                               f"`doit unlock`")
        log(f"{server.name}: note: breaking the lock of a deploy that died: {describe(holder)}")
        server.tool_call("unlock", path, holder.get("token", ""))
        if not server.tool_call("lock", path, json.dumps(info)).get("taken"):
            raise ToolkitError(f"{server.name}: another deploy took the lock just now; try again")
        present = None
    try:
        with sigterm_raises():
            yield {**info, "package_present": present}
    finally:
        release_lock(server, info["token"], log)


def release_lock(server, token: str, log=print) -> None:
    """Unlock with our token; if the connection died (a cut SSH link), open a new one once."""
    for attempt in (1, 2):
        if attempt == 2 and sys.is_finalizing():
            break  # Python is exiting: a new connection would wait forever for its thread
        try:
            if attempt == 2:
                server.reconnect()
            server.tool_call("unlock", str(server.deploy_path), token,
                             what="releasing the deploy lock")
            return
        except Exception as error:  # noqa: BLE001 - best effort; the user is told below
            failure = error
    log(f"{server.name}: warning: could not release the deploy lock ({failure}); run "
        f"`doit unlock`")
