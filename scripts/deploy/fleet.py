"""Deploys to several servers: every server is prepared in parallel (bounded by
DEPLOY_PARALLEL) while the old release keeps serving everywhere; then the switch rolls through
batches (DEPLOY_BATCH), each batch healthy before the next. A failure stops the rollout and
returns every switched server to its previous release, so the fleet never ends on mixed
versions without saying so. One server is simply a fleet of one."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scripts.deploy.deploy import (DeployOutcome, end_candidate, finish, go_live, log_entry,
                                   log_quietly, needs_deploy, prepare, switch_back)
from scripts.deploy.lock import Interrupted, deploy_lock, sigterm_raises
from scripts.deploy.report import Reporter
from scripts.deploy.server import Server
from scripts.errors import ToolkitError
from scripts.settings import Settings

if TYPE_CHECKING:  # annotations only: the build's modules (pathspec, tarfile) would
    from scripts.build.package import BuildRecord  # slow every rollback


@dataclass
class Member:
    server: Server
    reporter: Reporter
    previous: str | None
    lock: object = None  # the deploy_lock context, once taken
    package_present: bool | None = None  # what the lock's call said


def batches(items: list, batch: str) -> list[list]:
    """DEPLOY_BATCH: a count ("2") or a share of the fleet ("25%"); at least one server."""
    if batch.endswith("%"):
        size = math.ceil(len(items) * int(batch[:-1]) / 100)
    else:
        size = int(batch)
    size = max(1, size)
    return [items[start:start + size] for start in range(0, len(items), size)]


def run_parallel(jobs: list, limit: int) -> list[BaseException | None]:
    """Run every job (all of them, even when one fails); their errors, in order."""
    def attempt(job):
        try:
            job()
        except Exception as error:  # noqa: BLE001 - reported to the caller, in order
            return error
        return None
    if len(jobs) == 1:
        return [attempt(jobs[0])]
    with ThreadPoolExecutor(max_workers=max(1, min(limit, len(jobs)))) as pool:
        return list(pool.map(attempt, jobs))


def _end_candidates(members: list, settings: Settings) -> None:
    """Members that prepared but will not switch (see deploy.py's end_candidate)."""
    run_parallel([lambda m=m: end_candidate(m.server, settings) for m in members],
                 settings.deploy_parallel)


def _first_error(members: list, errors: list) -> None:
    failed = [(member, error) for member, error in zip(members, errors) if error]
    if failed:
        raise failed[0][1]


@contextmanager
def connected(servers: list[Server], limit: int):
    """Every server's SSH connection, opened at once (each is a handshake worth waiting for
    only once), all closed at the end; if one cannot connect, the others are closed again."""
    with ExitStack() as stack:
        # Registered first, so that even Ctrl-C while connecting closes what was opened
        # (closing a server that never connected does nothing).
        stack.callback(run_parallel, [server.close for server in servers], limit)
        _first_error(servers, run_parallel([server.__enter__ for server in servers], limit))
        yield


def _take_locks(members: list[Member], record: BuildRecord, limit: int,
                stack: ExitStack) -> None:
    """Each member's deploy lock, taken at once (each call also says whether the server has
    the package); the stack releases those that were taken."""
    def take(member: Member):
        lock_started = time.monotonic()
        lock = deploy_lock(member.server, record.release_id, "deploy",
                           log=member.reporter.line, package=(record.package, record.sha256))
        member.package_present = lock.__enter__()["package_present"]
        member.lock = lock
        member.reporter.line(f"{member.reporter.verdict(True):8} {'lock':10} {time.monotonic() - lock_started:5.2f} s"
                             f"  {member.server.deploy_path}/.deploy-lock taken")
    def release_taken():  # at once too; each release is best effort and warns if it fails
        run_parallel([lambda m=m: m.lock.__exit__(None, None, None)
                      for m in members if m.lock is not None], limit)
    # Registered before any lock is taken: SIGTERM while they are being taken releases them too
    # (the pool finishes its jobs first, so every lock taken is recorded by then).
    stack.callback(release_taken)
    _first_error(members, run_parallel([lambda m=m: take(m) for m in members], limit))


def _switched(member: Member) -> bool:
    current = member.server.tool_call("probe", str(member.server.deploy_path)).get("current")
    return current != member.previous


def _return(member: Member, settings: Settings, why: str) -> None:
    switch_back(member.server, settings, member.previous)
    member.reporter.line(f"{'changed':8} {'return':10}        back to {member.previous} ({why})")


def deploy_fleet(pairs: list[tuple[Server, Reporter]], settings: Settings, record: BuildRecord,
                 package: Path, on_start=lambda: None) -> list[DeployOutcome]:
    started = time.monotonic()
    release = record.release_id
    outcomes: dict[str, DeployOutcome] = {}
    decisions: dict[str, tuple[bool, str | None]] = {}

    def decide(server: Server):
        decisions[server.name] = needs_deploy(server, settings, release)
    _first_error(pairs, run_parallel([lambda s=server: decide(s) for server, _ in pairs],
                                     settings.deploy_parallel))
    members: list[Member] = []
    for server, reporter in pairs:
        needed, current = decisions[server.name]
        if needed:
            members.append(Member(server, reporter, current))
        else:
            reporter.line(f"ok: release {release} is already current and serving; nothing to do")
            outcomes[server.name] = DeployOutcome(server.name, release, current, False,
                                                  time.monotonic() - started)
    if members:
        # SIGTERM is taken in the main thread, while workers hold locks: every lock is released.
        with sigterm_raises(), ExitStack() as locks:
            _take_locks(members, record, settings.deploy_parallel, locks)
            on_start()
            try:
                _roll_out(members, settings, record, package)
            except BaseException as error:
                for member in members:
                    log_quietly(member.server, log_entry(
                        "deploy", release, member.previous, started, "failed", record,
                        member.reporter.failed_step or "rollout",
                        (str(error) or type(error).__name__).splitlines()[0]))
                raise
            _first_error(members, run_parallel(
                [lambda m=m: m.server.tool_call("log", str(m.server.deploy_path), json.dumps(
                    log_entry("deploy", release, m.previous, started, "ok", record)))
                 for m in members], settings.deploy_parallel))
            for member in members:
                outcomes[member.server.name] = DeployOutcome(
                    member.server.name, release, member.previous, True,
                    time.monotonic() - started)
    return [outcomes[server.name] for server, _ in pairs]


def _roll_out(members: list[Member], settings: Settings, record: BuildRecord,
              package: Path) -> None:
    release = record.release_id
    errors = run_parallel([lambda m=m: prepare(m.server, settings, record, package, m.reporter,
                                               m.package_present)
                           for m in members], settings.deploy_parallel)
    if any(errors):  # no server switches: the candidates the others booted end too
        _end_candidates([m for m, error in zip(members, errors) if error is None], settings)
    _first_error(members, errors)
    switched: list[Member] = []
    in_flight: list[Member] = []
    try:
        for batch in batches(members, settings.deploy_batch):
            in_flight = batch
            errors = run_parallel([lambda m=m: go_live(m.server, settings, release, m.reporter)
                                   for m in batch], settings.deploy_parallel)
            in_flight = []
            # A server whose restart failed switched itself back; the others are live.
            switched += [m for m, error in zip(batch, errors) if error is None]
            failed = [(m, error) for m, error in zip(batch, errors) if error]
            if failed:
                for member in switched:
                    _return(member, settings, "the rollout stopped")
                _end_candidates(members[members.index(batch[-1]) + 1:], settings)
                member, error = failed[0]
                raise ToolkitError(f"rollout stopped at {member.server.name}: {error}; "
                                   f"{len(switched)} server(s) that had switched are back on "
                                   f"their previous release, the rest never switched")
    except (KeyboardInterrupt, Interrupted):
        # Ctrl-C or SIGTERM: each server of the batch in flight may have switched, restarted,
        # or neither. One that ran in this thread was cut mid-command: its shell session is
        # out of step, so it gets a fresh connection first.
        for member in switched + in_flight:
            if member in in_flight:
                member.server.reconnect()
                if not _switched(member):
                    continue
            _return(member, settings, "the deploy was interrupted")
        raise
    errors = run_parallel([lambda m=m: finish(m.server, settings, release, m.reporter)
                           for m in members], settings.deploy_parallel)
    _first_error(members, errors)
