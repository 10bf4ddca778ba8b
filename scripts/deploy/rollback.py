"""rollback_deployment: back to the previous good release (by recorded order, not by mtime) or
to RELEASE, health-gated like a deploy. The database stays as it is: restoring a backup is
always the explicit, one-time `doit restore`, never a setting a rollback picks up."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import PurePosixPath

from scripts.deploy.deploy import (DeployOutcome, go_live, log_entry, log_quietly,
                                   start_preflight)
from scripts.deploy.lock import deploy_lock
from scripts.deploy.report import Reporter
from scripts.deploy.server import Server
from scripts.errors import ToolkitError
from scripts.settings import Settings


def rollback_server(server: Server, settings: Settings, reporter: Reporter,
                    stay_on_current: bool = False, undo_last_deploy: bool = False
                    ) -> DeployOutcome:
    """Switch to the previous good release (or RELEASE). With stay_on_current (`doit
    restore`), keep the current release and only restore RESTORE_BACKUP under it, after a
    safety backup of the database it overwrites. With
    undo_last_deploy (a failed verification), go back to what served before the last deploy
    and stop counting the failed release as good."""
    started = time.monotonic()
    path = str(server.deploy_path)
    if not server.ensure_tool():
        raise ToolkitError(f"{server.name}: {path} is not set up for deploys; run `doit setup`")
    answer = server.tool_call("previous-good", path)
    state = server.tool_call("probe", path)
    current = answer.get("current")
    chosen = resolve_release(server.name, settings.release, state) if settings.release else None
    target = current if stay_on_current else chosen or answer.get("previous")
    if undo_last_deploy:
        target = _served_before_last_deploy(server, current) or target
    if not target:
        raise ToolkitError(f"{server.name}: nothing to roll back to: release {current} is the "
                           f"only good release on the server")
    restore = settings.restore_backup if stay_on_current else ""
    if restore:  # a name that is not there: one line, before anything is locked or logged
        names = [PurePosixPath(backup).name for backup in
                 server.tool_call("backups", str(settings.backup_path))["backups"]]
        if restore not in names:
            raise ToolkitError(f"{server.name}: RESTORE_BACKUP={restore} is not a backup on "
                               f"this server; `doit backups` lists them (the newest: "
                               f"{names[-1] if names else 'none yet'})")
    action = "restore" if stay_on_current else "rollback"  # as the history shows it
    if settings.restore_backup and not stay_on_current:
        reporter.warning(f"RESTORE_BACKUP={settings.restore_backup} is set, but a rollback "
                         f"never restores a backup: the database stays as it is (restore it "
                         f"with `RESTORE_BACKUP=<name> doit restore`, then unset it)")
    if target == current and not restore:
        reporter.line(f"ok: release {target} is already current; nothing to do")
        return DeployOutcome(server.name, target, current, False, time.monotonic() - started)
    already_good = target in state.get("good", [])
    with deploy_lock(server, target, action, log=reporter.line):
        try:
            with reporter.step("preflight") as outcome:
                kept = server.tool_call("set-next", path, target).get("health_path")
                # The release answers where it was deployed to answer (HEALTH_PATH may have
                # changed since); one deployed before releases kept it gets the setting's.
                if kept and kept != settings.health_path:
                    settings = dataclasses.replace(settings, health_path=kept)
                if already_good:
                    # It served before: the health check after the restart gates it (and
                    # switches back if it fails); that keeps a rollback near one second.
                    outcome.detail = f"{target} went live before; checked after the restart"
                else:
                    # Not beside the live release when a backup is restored next: a candidate
                    # would have opened the database the restore replaces.
                    where = start_preflight(server, settings, target, beside=not restore)
                    outcome.detail = f"{target} healthy on the spare port, {where}"
            if restore:
                with reporter.step("restore") as outcome:
                    backup = str(settings.backup_path / restore)
                    answer = server.tool_call("restore", path, backup, str(settings.backup_path))
                    outcome.changed = True
                    saved = answer.get("safety_backup")
                    if server.dry_run:  # the server tool ran nothing: no answer to report
                        outcome.detail = (f"from {backup}; the database it would overwrite is "
                                          f"first backed up (<now>-<release>-before-restore)")
                    else:
                        outcome.detail = (
                            f"{', '.join(answer.get('restored', []))} from "
                            f"{answer.get('backup', backup)}; "
                            + (f"the database it overwrote is saved in {saved}" if saved else
                               "there was no database to save first")
                            + f" (requests held {answer.get('held_s', 0):.2f} s)")
            go_live(server, settings, target, reporter)
        except BaseException as error:
            log_quietly(server, log_entry(action, target, current, started, "failed",
                                           step=reporter.failed_step, error=str(error)))
            raise
        entry = json.dumps(log_entry(action, target, current, started, "ok"))
        if current and current != target:
            server.tool_call("rolled-back", path, target, current, entry)
        else:
            server.tool_call("log", path, entry)
    return DeployOutcome(server.name, target, current, True, time.monotonic() - started)


def resolve_release(server_name: str, wanted: str, state: dict) -> str:
    """RELEASE as a whole id or a unique prefix of one on the server (as git takes commits);
    otherwise an error that lists the ids there are, before anything is locked or logged."""
    on_server = state.get("releases", [])
    if wanted in on_server:
        return wanted
    matches = [release for release in on_server if release.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    good = list(reversed(state.get("good", [])))
    others = [r for r in on_server if r not in good]
    listed = f"(good, newest first): {', '.join(good) or 'none'}"
    if others:
        listed += f"; others (rolled back from or failed): {', '.join(others)}"
    if matches:
        raise ToolkitError(f"{server_name}: RELEASE={wanted} matches {len(matches)} releases "
                           f"({', '.join(matches)}); give more of its characters")
    raise ToolkitError(f"{server_name}: RELEASE={wanted} is not on this server (as an id or "
                       f"the start of one); releases there {listed}")


def _served_before_last_deploy(server: Server, current: str | None) -> str | None:
    """The release the deploy log says was live before `current` was deployed."""
    entries = server.tool_call("history", str(server.deploy_path), 50).get("entries", [])
    for entry in reversed(entries):
        if entry.get("action") == "deploy" and entry.get("result") == "ok" \
                and entry.get("release") == current:
            return entry.get("previous")
    return None
