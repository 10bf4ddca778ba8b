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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from scripts.build.package import BuildRecord
from scripts.deploy.deploy import (DeployOutcome, finish, go_live, log_entry, log_quietly,
                                   needs_deploy, prepare, switch_back)
from scripts.deploy.lock import deploy_lock
from scripts.deploy.report import Reporter
from scripts.deploy.server import Server
from scripts.errors import ToolkitError
from scripts.settings import Settings


@dataclass
class Member:
    server: Server
    reporter: Reporter
    previous: str | None


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


def _first_error(members: list[Member], errors: list) -> None:
    failed = [(member, error) for member, error in zip(members, errors) if error]
    if failed:
        raise failed[0][1]


def deploy_fleet(pairs: list[tuple[Server, Reporter]], settings: Settings, record: BuildRecord,
                 package: Path, on_start=lambda: None) -> list[DeployOutcome]:
    started = time.monotonic()
    release = record.release_id
    outcomes: dict[str, DeployOutcome] = {}
    members: list[Member] = []
    for server, reporter in pairs:
        needed, current = needs_deploy(server, settings, release)
        if needed:
            members.append(Member(server, reporter, current))
        else:
            reporter.line(f"ok: release {release} is already current and serving; nothing to do")
            outcomes[server.name] = DeployOutcome(server.name, release, current, False,
                                                  time.monotonic() - started)
    if members:
        with ExitStack() as locks:
            for member in members:
                lock_started = time.monotonic()
                locks.enter_context(deploy_lock(member.server, release, "deploy",
                                                log=member.reporter.line))
                member.reporter.line(f"{'changed':8} {'lock':10} "
                                     f"{time.monotonic() - lock_started:5.2f} s  "
                                     f"{member.server.deploy_path}/.deploy-lock taken")
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
            for member in members:
                member.server.tool_call("log", str(member.server.deploy_path), json.dumps(
                    log_entry("deploy", release, member.previous, started, "ok", record)))
                outcomes[member.server.name] = DeployOutcome(
                    member.server.name, release, member.previous, True,
                    time.monotonic() - started)
    return [outcomes[server.name] for server, _ in pairs]


def _roll_out(members: list[Member], settings: Settings, record: BuildRecord,
              package: Path) -> None:
    release = record.release_id
    errors = run_parallel([lambda m=m: prepare(m.server, settings, record, package, m.reporter)
                           for m in members], settings.deploy_parallel)
    _first_error(members, errors)
    switched: list[Member] = []
    for batch in batches(members, settings.deploy_batch):
        errors = run_parallel([lambda m=m: go_live(m.server, settings, release, m.reporter)
                               for m in batch], settings.deploy_parallel)
        # A server whose restart failed switched itself back; the others of this batch are live.
        switched += [m for m, error in zip(batch, errors) if error is None]
        failed = [(m, error) for m, error in zip(batch, errors) if error]
        if failed:
            for member in switched:
                switch_back(member.server, settings, member.previous)
                member.reporter.line(f"{'changed':8} {'return':10}        back to "
                                     f"{member.previous} (the rollout stopped)")
            member, error = failed[0]
            raise ToolkitError(f"rollout stopped at {member.server.name}: {error}; "
                               f"{len(switched)} server(s) that had switched are back on their "
                               f"previous release, the rest never switched")
    errors = run_parallel([lambda m=m: finish(m.server, settings, release, m.reporter)
                           for m in members], settings.deploy_parallel)
    _first_error(members, errors)
