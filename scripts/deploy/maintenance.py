"""Maintenance mode: while DEPLOY_PATH/shared/maintenance.on exists, nginx answers the public
503 with Retry-After and the live release's maintenance.html (conf/nginx-maintenance.conf);
requests from the server itself still reach the app.

The flag is the deploy user's file. nginx's workers (www-data) look for it per request; root's
master never reads it, so whatever the deploy user puts there steers nothing of root's."""

from __future__ import annotations

import datetime
import json
from contextlib import contextmanager
from pathlib import PurePosixPath

from scripts.deploy.lock import who
from scripts.deploy.report import Reporter
from scripts.deploy.server import Server
from scripts.settings import Settings

FLAG = "shared/maintenance.on"
PAGE = "maintenance.html"  # in the app's package, at its top


def flag_path(deploy_path: PurePosixPath) -> PurePosixPath:
    return deploy_path / FLAG


def state(server: Server) -> dict | None:
    """The flag's record ({since, who, why}) while maintenance is on, else None."""
    result = server.run(["cat", str(flag_path(server.deploy_path))], check=False, reads=True)
    if result.status != 0:
        return None
    try:
        record = json.loads(result.stdout or "{}")
    except ValueError:
        record = {}
    return record if isinstance(record, dict) else {}


def describe(record: dict | None) -> str:
    if record is None:
        return "off"
    return (f"on since {record.get('since', '?')} by {record.get('who', '?')}"
            f" ({record.get('why', 'doit maintenance on')})")


def turn_on(server: Server, why: str) -> bool:
    """True when it changed (it was off)."""
    if state(server) is not None:
        return False
    flag = flag_path(server.deploy_path)
    record = {"since": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "who": who(), "why": why}
    staged = flag.with_name(flag.name + ".new")
    server.put(json.dumps(record).encode(), staged)  # 0600: nginx only stats it
    server.run(["mv", "-f", str(staged), str(flag)])  # whole, at once
    return True


def turn_off(server: Server) -> bool:
    if state(server) is None:
        return False
    server.run(["rm", "-f", str(flag_path(server.deploy_path))])
    return True


@contextmanager
def during_migrations(server: Server, settings: Settings, reporter: Reporter):
    """MAINTENANCE_DURING_MIGRATIONS: maintenance on while the migrations run, off again after
    them whatever happens (left on if someone had turned it on before)."""
    if not settings.maintenance_during_migrations:
        yield
        return
    with reporter.step("maintenance") as outcome:
        outcome.changed = turn_on(server, "the deploy's migrations")
        outcome.detail = ("on for the migrations (MAINTENANCE_DURING_MIGRATIONS=1)"
                          if outcome.changed else "already on; it stays on")
    try:
        yield
    finally:
        if outcome.changed:
            with reporter.step("maintenance") as outcome_off:
                outcome_off.changed = turn_off(server)
                outcome_off.detail = "off after the migrations"
