"""deploy_to_server: ship a built package to one server and switch to it with no failed request.

lock -> upload -> unpack -> venv -> shared -> backup -> migrate -> preflight -> switch ->
restart -> finish (mark good, prune) -> log -> unlock. Until `switch`, the old release serves
and nothing it uses was touched (a failed migration is undone from a backup taken with the
app's requests held, so the restore loses nothing the app acknowledged)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scripts.deploy import commands, hooks, maintenance
from scripts.deploy.lock import who
from scripts.deploy.report import Reporter
from scripts.deploy.server import Server
from scripts.errors import ToolkitError
from scripts.settings import Settings

if TYPE_CHECKING:  # annotations only: the build's modules (pathspec, tarfile) would
    from scripts.build.package import BuildRecord  # slow every rollback


@dataclass
class DeployOutcome:
    server: str
    release: str
    previous: str | None
    changed: bool
    seconds: float


def log_entry(action: str, release: str, previous: str | None, started: float, result: str,
              record: BuildRecord | None = None, step: str = "", error: str = "") -> dict:
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "action": action, "who": who(), "release": release, "previous": previous,
             "duration_s": round(time.monotonic() - started, 2), "result": result}
    if record is not None:
        entry["git_commit"] = record.git_commit
    if step:
        entry.update(step=step, error=error)
    return entry


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::|$)")
_FRAME_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def explain_failure(journal_lines: list[str]) -> str:
    """The cause in a failed unit's journal: the last exception with the file and line it was
    raised at (its path inside the release), else the journal's last lines."""
    messages = [line.split(": ", 1)[-1].rstrip() for line in journal_lines]
    # Only the last run's lines: systemd's "Starting <unit>" opens each run, and an exception
    # of an earlier failed deploy must not explain this one.
    starts = [index for index, text in enumerate(messages) if text.startswith("Starting ")]
    messages = messages[starts[-1] + 1:] if starts else messages
    for index in range(len(messages) - 1, -1, -1):
        if not _EXCEPTION_LINE.match(messages[index].strip()):
            continue
        cause = messages[index].strip()
        frames = [_FRAME_LINE.search(text) for text in messages[:index]]
        frames = [frame for frame in frames if frame]
        if frames:
            file_name = re.sub(r"^.*/releases/[^/]+/", "", frames[-1].group(1))
            cause += f" (in {file_name}, line {frames[-1].group(2)})"
        if cause.startswith("ModuleNotFoundError"):
            cause += "; is the package in the app's requirements.txt?"
        return cause
    clicks = [text.strip() for text in messages if text.strip().startswith("Error: ")]
    if clicks:  # a flask/click command's own one-line reason (`No such command 'migrate'.`)
        return clicks[-1]
    return " | ".join(message for message in messages[-4:] if message.strip()) or "no journal"


def journal_tail(server: Server, unit: str, lines: int = 30, since: str = "") -> str:
    """Why UNIT's last run failed, from its journal (after the last line holding SINCE, when
    given: a candidate boots in the live unit, whose journal holds more)."""
    text = server.sudo(commands.journal(unit, lines), check=False, reads=True).stdout
    found = text.strip().splitlines()
    if since:
        marks = [index for index, line in enumerate(found) if since in line]
        found = found[marks[-1] + 1:] if marks else found
    return explain_failure(found)


def _started_healthy(server: Server, settings: Settings, subcommand: str, units: list[str],
                     port: int, release: str, dry_run_actions: tuple[str, ...],
                     *more: str) -> dict:
    """One call of the server tool: (re)start the app on one of UNITS (the last) and wait
    until it answers healthy on PORT with the release. A dry run prints the systemctl
    commands the tool would run there."""
    if server.dry_run:
        for action in dry_run_actions:
            server.sudo(commands.systemctl(action, units[-1]))
        return {"started": True, "healthy": True}
    return server.tool_call(subcommand, str(server.deploy_path), *units,
                            commands.health_url(port, settings.health_path),
                            release, settings.health_timeout_s, *more, reads=False)


def start_preflight(server: Server, settings: Settings, release: str,
                    beside: bool = True) -> str:
    """Boot `next` on the spare port and require its health check: BESIDE the live release
    when the service can take a hand-over (the candidate then takes over at the switch: one
    boot per deploy), else in the preflight unit, stopped again. Says where."""
    units = commands.units(settings)
    if server.dry_run:  # booted beside the live release; a service that cannot: the unit
        server.sudo(commands.hand_over(units["app"]))
    answer = _started_healthy(server, settings, "preflight", [units["app"], units["preflight"]],
                              commands.preflight_port(settings), release,
                              ("stop", "start", "stop"), "1" if beside else "")
    if answer.get("healthy"):
        return ("booted beside the live release; it takes over at the switch"
                if answer.get("how") == "beside" else "in the preflight unit")
    if not answer.get("started"):
        journal = answer.get("journal") or units["preflight"]
        lines = 50 if journal == units["app"] else 30  # the counts sudoers allows
        raise ToolkitError(f"{server.name}: release {release} does not start: "
                           f"{journal_tail(server, journal, lines, answer.get('since', ''))}; "
                           f"the old release keeps serving")
    error = answer.get("error") or ""
    # A 404 is no matter of time: the app has no such route (a newcomer's own app).
    setting = (f"HEALTH_PATH={settings.health_path}: is it a route of the app?"
               if "answered HTTP 404" in error else
               f"HEALTH_TIMEOUT_S={settings.health_timeout_s}")
    raise ToolkitError(f"{server.name}: health check of the new release failed: {error} "
                       f"({setting}); the old release keeps serving")


HOW_IT_WENT_LIVE = {
    "handed over": "booted beside the old release, which stays parked for a quick rollback",
    "handed over alone": "booted beside the old release, which then ended",
    "took over": "booted beside the old release at the preflight, and took over; the old one "
                 "stays parked for a quick rollback",
    "took over alone": "booted beside the old release at the preflight, and took over; the old "
                       "one then ended",
    "woke": "woke from parked: it was still loaded",
    "restarted": "restarted",
}


def restart_and_check(server: Server, settings: Settings, release: str) -> str:
    """Put the service onto `current` and require its health: by a hand-over (the old release
    serves until the new one has booted) or a restart (systemd holds the socket, so requests
    wait instead of failing). Says how."""
    if server.dry_run:
        # the hand-over; a service that cannot take one restarts (the lines that follow)
        server.sudo(commands.hand_over(commands.units(settings)["app"]))
    answer = _started_healthy(server, settings, "restart", [commands.units(settings)["app"]],
                              settings.app_port, release, ("reset-failed", "restart"))
    if answer.get("healthy"):
        # A dry run's answer does not say: that depends on the running service.
        return HOW_IT_WENT_LIVE.get(answer.get("how"), "handed over, or restarted")
    if not answer.get("started"):
        raise ToolkitError(f"{server.name}: restarting the service failed: "
                           f"{answer.get('error')}")
    raise ToolkitError(f"{server.name}: health check after the restart failed: "
                       f"{answer.get('error')}")


def upload_package(server: Server, record: BuildRecord, package: Path,
                   present: bool | None = None) -> bool:
    """Send the package to NAME.partial unless the server has it (`present`: what the lock's
    call said; None: ask). The prepare call accepts it only if its sha256 matches."""
    path = str(server.deploy_path)
    if present is None:
        present = server.tool_call("has-package", path, record.package,
                                   record.sha256).get("present")
    if present:
        return False
    remote = commands.package_path(server.deploy_path, record.package)
    server.run(["mkdir", "-p", str(remote.parent)])
    server.put(package.read_bytes(), remote.with_name(remote.name + ".partial"))
    return True


def backup_and_migrate(server: Server, settings: Settings, release: str, reporter: Reporter,
                       planned_databases: list[str], prepared: dict) -> None:
    """The backup and migrate steps. When the migrations run, both happen in one call on the
    server with every request to the app held (the write gate, see server_tool.py): the backup
    is exact, so restoring it after a failed migration loses no acknowledged write. When there
    is nothing to migrate, the backup is taken with the app serving as usual. A dry run says
    what would be backed up from planned_databases (what the server has now)."""
    planned = (f"{settings.backup_path}/<now>-{release} ({', '.join(planned_databases)})"
               if server.dry_run and planned_databases else None)
    path = str(server.deploy_path)
    answer = prepared.get("next", {})
    skipped = ""
    if not settings.migrate_command:
        skipped = "no MIGRATE_COMMAND"
    elif answer.get("migrations_unchanged"):
        skipped = (f"skipped: {', '.join(settings.migrations_paths)} unchanged since "
                   f"{answer.get('current')}, and so is MIGRATE_COMMAND (MIGRATIONS_PATHS)")
    keep = (settings.backups_keep, settings.backups_keep_days)
    if skipped:
        with reporter.step("backup") as outcome:  # taken by the prepare call
            backup = prepared.get("backup", {}).get("backup") or planned
            outcome.changed = bool(backup)
            outcome.seconds = prepared.get("backup", {}).get("seconds")
            outcome.detail = backup or "no database yet"
        with reporter.step("migrate") as outcome:
            outcome.detail = skipped
        return
    unit = commands.units(settings)["migrate"]
    with maintenance.during_migrations(server, settings, reporter), \
            reporter.step("backup") as outcome:
        held = server.tool_call("migrate-held", path, str(settings.backup_path), release, *keep,
                                unit, what="the backup and migrations")
        backup = held.get("backup") or planned
        outcome.changed = bool(backup)
        outcome.seconds = held.get("backup_s")
        outcome.detail = backup or "no database yet"
    with reporter.step("migrate") as outcome:
        outcome.seconds = held.get("held_s", 0) - (held.get("backup_s") or 0)
        if held.get("migrated") or server.dry_run:
            outcome.changed = True
            outcome.detail = (f"{settings.migrate_command} ({why_migrations_run(settings, answer)}"
                              f"; requests held {held.get('held_s', 0):.2f} s for the backup "
                              f"and migrations)")
            return
        # The setting, by name: the command is the user's, and so is the fix.
        reason = f"setting MIGRATE_COMMAND={settings.migrate_command!r}: " \
                 f"{journal_tail(server, unit)}"
        if "No such command" in reason:  # the default names a command the app does not have
            reason += "; set it to the app's own (`flask --app notes init-db`), or empty for none"
        if held.get("restored"):
            raise ToolkitError(
                f"{server.name}: migrations of {release} failed ({reason}); requests were held "
                f"from the backup to the restore, so the database was restored exactly as it "
                f"was from {backup}: no acknowledged write was lost; the old release keeps "
                f"serving")
        raise ToolkitError(f"{server.name}: migrations of {release} failed ({reason}); there "
                           f"was no database before them, so nothing was restored; the old "
                           f"release keeps serving")


def why_migrations_run(settings: Settings, answer: dict) -> str:
    """Why the migrate step runs, from set-next's (or a dry run's plan's) answer."""
    if not settings.migrations_paths:
        return "MIGRATIONS_PATHS is empty: always"
    reasons = [f"{', '.join(answer['migrations_changed'])} changed"] \
        if answer.get("migrations_changed") else []
    if answer.get("command_changed"):
        reasons.append("MIGRATE_COMMAND changed")
    if not reasons:  # the first deploy, or a live release deployed again
        return "no other live release to compare with"
    return f"{' and '.join(reasons)} since {answer.get('current')}"


def deploy_to_server(server: Server, settings: Settings, record: BuildRecord, package: Path,
                     reporter: Reporter, on_start=lambda: None) -> DeployOutcome:
    """One server: the fleet of one (see scripts/deploy/fleet.py)."""
    from scripts.deploy.fleet import deploy_fleet
    return deploy_fleet([(server, reporter)], settings, record, package, on_start)[0]


def needs_deploy(server: Server, settings: Settings, release: str) -> tuple[bool, str | None]:
    """(False, current) when the release already serves here, else (True, current)."""
    path = str(server.deploy_path)
    if not server.ensure_tool():
        raise ToolkitError(f"{server.name}: {path} is not set up for deploys; run `doit setup`")
    state = live_state(server, settings, release)
    current = state.get("current")
    if release in state.get("failed", []) and not settings.force_release:
        raise ToolkitError(f"{server.name}: release {release} failed verification before; fix "
                           f"the app and build again (a new release), or ship it anyway with "
                           f"FORCE_RELEASE=1")
    if already_live(state, release):
        return False, current
    return True, current


def live_state(server: Server, settings: Settings, release: str) -> dict:
    """The server's probe, with whether `release` serves there now (one round trip)."""
    return server.tool_call("probe", str(server.deploy_path),
                            commands.health_url(settings.app_port, settings.health_path),
                            release)


def already_live(state: dict, release: str) -> bool:
    """The release is current, went live before, and the running service answers with it
    (not just: `current` points at it; a deploy killed between switch and restart leaves
    those two different)."""
    return state.get("current") == release and release in state.get("good", []) \
        and bool(state.get("serving"))


def dry_run_facts(server: Server, settings: Settings, record: BuildRecord,
                  package: Path) -> dict:
    """What the server holds that decides each step's outcome (read, never changed), so a dry
    run's plan says what a real run would do."""
    import tarfile

    from scripts.build.package import MANIFEST_NAME
    from scripts.deploy.server_tool import requirements_key

    path = str(server.deploy_path)
    with tarfile.open(package, "r:gz") as tar:
        manifest = json.load(tar.extractfile(MANIFEST_NAME))
    key = requirements_key(manifest, server.tool_call("probe", path)["python"])
    facts = server.tool_call("plan", path, record.release_id, key, commands.env_file(settings),
                             json.dumps(migrations_in(manifest, settings.migrations_paths)),
                             settings.migrate_command)
    facts["venv"] = key
    return facts


def migrations_in(manifest: dict, migrations_paths: tuple[str, ...]) -> dict:
    """{MIGRATIONS_PATHS item: {file under it ("" for the item itself): sha256}}, as the server
    tool's set-next computes it from an unpacked release."""
    wanted: dict[str, dict[str, str]] = {item: {} for item in migrations_paths}
    for entry in manifest.get("files", []):
        for item in migrations_paths:
            if entry["path"] == item:
                wanted[item][""] = entry["sha256"]
            elif entry["path"].startswith(item + "/"):
                wanted[item][entry["path"][len(item) + 1:]] = entry["sha256"]
    return wanted


def prepare(server: Server, settings: Settings, record: BuildRecord, package: Path,
            reporter: Reporter, package_present: bool | None = None) -> None:
    """Everything before the switch: the old release keeps serving, untouched. After the
    upload, the steps up to the backup are one call of the server tool (`prepare`), which
    answers each step's outcome and time."""
    path = str(server.deploy_path)
    release = record.release_id
    facts = dry_run_facts(server, settings, record, package) if server.dry_run else {}
    hooks.shipped(package, release)
    with reporter.step("upload") as outcome:
        outcome.changed = upload_package(server, record, package, package_present)
        outcome.detail = (f"{record.package} ({record.size / 1e6:.2f} MB)" if outcome.changed
                          else "package already on the server")
    uploaded_env = ""
    if settings.app_env_file:  # secrets: sent as a private file, never on a command line
        uploaded_env = f".env.upload-{secrets.token_hex(6)}"  # one per deploy
        server.put(settings.app_env_file.read_bytes(),
                   server.deploy_path / "shared" / uploaded_env)
    env_file = commands.env_file(settings)
    answer = server.tool_call(
        "prepare", path, release, record.package, record.sha256,
        "uploaded" if outcome.changed else "", env_file, uploaded_env,
        ",".join(settings.migrations_paths), settings.migrate_command,
        str(settings.backup_path), settings.backups_keep, settings.backups_keep_days,
        settings.health_path, what="preparing the release")
    steps = answer.get("steps", {})

    def step(name: str):
        """This step's answer; its failure raised inside its own reporter step."""
        failed = answer.get("failed")
        if failed == name or (name == "upload" and failed == "accept"):
            raise ToolkitError(f"{server.name}: {failed} failed: {answer.get('error')}")
        return steps.get(name, {})
    if answer.get("failed") == "accept":
        with reporter.step("upload"):
            step("upload")
    with reporter.step("unpack") as outcome:
        done = step("unpack")
        outcome.changed = not facts["unpacked"] if server.dry_run else done["changed"]
        outcome.seconds = done.get("seconds")
        outcome.detail = f"releases/{release}"
    with reporter.step("venv") as outcome:
        done = step("venv")
        outcome.changed = (not facts["venv_ready"] if server.dry_run
                           else bool(done.get("changed")))
        outcome.seconds = done.get("seconds")
        venv = facts.get("venv") or done.get("venv")
        outcome.detail = (f"built shared/venvs/{venv} from wheels" if outcome.changed else
                          f"reused shared/venvs/{venv} (same requirements)")
    with reporter.step("shared") as outcome:
        done = step("shared")
        outcome.seconds = done.get("seconds")
        if server.dry_run:
            from scripts.deploy.server_tool import with_secret_key, without_secret_key
            wanted, have = facts["env_sha256"], facts["env_sha256"]
            if settings.app_env_file:
                text = settings.app_env_file.read_bytes().decode(errors="replace")
                if with_secret_key(text, "", "x") != text:  # the server's key is kept
                    text = without_secret_key(with_secret_key(text, "", "x"))
                    have = facts.get("env_sha256_without_secret")
                wanted = hashlib.sha256(text.encode()).hexdigest()
            outcome.changed = not facts["unpacked"] or facts["env_sha256"] in (None, "") \
                or wanted != have
        else:
            outcome.changed = bool(done.get("changed"))
        outcome.detail = f"instance/, uploads/ -> shared/; {env_file} 0600"
    if answer.get("failed") in ("next", "backup"):
        with reporter.step(answer["failed"]):
            step(answer["failed"])
    hooks.on_server(server, settings, "pre-migrate", release, reporter)
    if server.dry_run:  # what set-next would answer
        steps = {**steps, "next": facts.get("migrations", {})}
    backup_and_migrate(server, settings, release, reporter, facts.get("databases", []), steps)
    hooks.on_server(server, settings, "post-migrate", release, reporter)
    with reporter.step("preflight") as outcome:
        where = start_preflight(server, settings, release)
        outcome.detail = (f"{release} healthy on 127.0.0.1:{commands.preflight_port(settings)}"
                          f"{settings.health_path}, {where}")
    try:
        hooks.on_server(server, settings, "pre-switch", release, reporter)
    except ToolkitError:
        end_candidate(server, settings)
        raise


def end_candidate(server: Server, settings: Settings) -> None:
    """After a healthy preflight, a deploy that will not switch: the candidate the preflight
    booted would hold the spare port and a whole app for CANDIDATE_WAIT_S; it ends now
    (nothing to end after a preflight in its own unit). Quietly: the error that stopped the
    deploy is the one to tell."""
    with contextlib.suppress(ToolkitError):
        server.tool_call("end-candidate", str(server.deploy_path),
                         commands.units(settings)["app"])


def go_live(server: Server, settings: Settings, release: str, reporter: Reporter) -> None:
    """Switch and restart; if the restarted service is unhealthy, switch this server back."""
    with reporter.step("switch") as outcome:
        answer = server.tool_call("switch", str(server.deploy_path), release)
        if server.dry_run:
            current = server.tool_call("probe", str(server.deploy_path)).get("current")
            answer = {"changed": current != release, "previous": current}
        outcome.changed = bool(answer.get("changed", True))
        outcome.detail = (f"current -> releases/{release} (was "
                          f"{answer.get('previous') or 'none: the first deploy'})")
    with reporter.step("restart") as outcome:
        try:
            how = restart_and_check(server, settings, release)
        except ToolkitError as error:
            previous = answer.get("previous")
            switch_back(server, settings, previous)
            if previous:
                raise ToolkitError(f"{error}; switched back: release {previous} serves "
                                   f"again") from None
            raise
        outcome.changed = True
        outcome.detail = f"{settings.service_name} serves {release}: {how}"
    after_switch_hook(server, settings, release, answer.get("previous"), reporter)


def after_switch_hook(server: Server, settings: Settings, release: str, previous: str | None,
                      reporter: Reporter) -> None:
    """post-switch: a failure switches this server back with AUTO_ROLLBACK (the rollout then
    stops and returns the others); without it the release stays and the deploy says so."""
    try:
        hooks.on_server(server, settings, "post-switch", release, reporter)
    except ToolkitError as error:
        if not settings.auto_rollback:
            reporter.late_failures.append(f"{error}; AUTO_ROLLBACK=0, so release {release} "
                                          f"stays live")
            return
        switch_back(server, settings, previous)
        raise ToolkitError(f"{error}; AUTO_ROLLBACK=1: switched back, release "
                           f"{previous or 'none'} serves again") from None


def finish(server: Server, settings: Settings, release: str, reporter: Reporter) -> None:
    with reporter.step("finish") as outcome:
        removed = server.tool_call("finish", str(server.deploy_path), release,
                                   settings.keep_releases).get("removed", [])
        outcome.changed = True
        outcome.detail = f"marked good; removed {len(removed)} old release(s)"


def switch_back(server: Server, settings: Settings, previous: str | None) -> None:
    if not previous:
        return
    server.tool_call("switch", str(server.deploy_path), previous)
    try:  # wakes the parked previous release when there is one, else restarts
        restart_and_check(server, settings, previous)
    except ToolkitError:
        pass  # the error that made this switch back is the one to report


def log_quietly(server: Server, entry: dict) -> None:
    try:
        server.tool_call("log", str(server.deploy_path), json.dumps(entry))
    except (ToolkitError, OSError, EOFError):
        pass
