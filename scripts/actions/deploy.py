"""doit actions for check, ship (deploy_to_server), verify, rollback, status, logs, unlock and
backups: they load settings, find the servers, and print what a person needs to read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scripts.actions import connect_early, user_errors_fail_task
from scripts.errors import ToolkitError
from scripts.settings import Settings, load_settings

if TYPE_CHECKING:  # annotations only
    from scripts.build.package import BuildRecord
    from scripts.deploy.report import Reporter
    from scripts.notify import Event, Notifier
    from scripts.remote import Target

# dodo.py imports this module for every doit command, `doit list` included: the modules that
# reach servers (plumbum, requests, the deploy steps) are imported by the actions that use them,
# after connect_early, so that loading them overlaps the SSH handshakes.


def built_package(settings: Settings) -> tuple[BuildRecord, Path]:
    from scripts.build.package import BuildRecord, record_path
    record_file = record_path(settings)
    if not record_file.exists():
        raise ToolkitError(f"no package built: {record_file} is missing; run `doit build` (in CI: "
                           f"the build_deployment_package job's artifact)")
    record = BuildRecord.read(record_file)
    package = settings.dist_dir / record.package
    if not package.exists():
        raise ToolkitError(f"package {package} is missing; run `doit build`")
    return record, package


def public_urls(settings: Settings, targets: list[Target]) -> dict[str, str]:
    """Where a person opens the app: PUBLIC_URL, the sandbox's forwarded port, or http://host/."""
    from scripts.deploy import commands, https
    if settings.public_url:
        return {t.display: settings.public_url for t in targets}
    if settings.https and not settings.uses_sandbox:  # the name the certificate is for
        return {t.display: f"https://{https.primary_name(settings)}/" for t in targets}
    if settings.uses_sandbox:
        from scripts.sandbox import sandbox_from_settings
        return {s.name: s.url for s in sandbox_from_settings(settings).servers()}
    return {t.display: commands.host_url(t.address) for t in targets}


def _servers(settings: Settings):
    from scripts.remote import begin_connecting
    from scripts.targets import deploy_targets
    targets = deploy_targets(settings)
    begin_connecting(targets, settings.deploy_parallel)
    from scripts.deploy.report import Reporter
    from scripts.deploy.server import Server
    for target in targets:
        reporter = Reporter(server=target.display, show_server=len(targets) > 1,
                            dry_run=settings.dry_run)
        yield Server(target, settings.deploy_path, settings.dry_run, log=reporter.line), reporter


def _set_up_servers(settings: Settings):
    """Connected servers that have the release layout; the others are named and skipped."""
    for server, reporter in _servers(settings):
        with server:
            if not server.ensure_tool():
                reporter.line(f"{settings.deploy_path} is not set up; run `doit setup`")
                continue
            yield server, reporter


def _print_results(reporter: Reporter, results: list[tuple[bool, str]]) -> bool:
    for ok, text in results:
        label = "WARNING" if ok and text.startswith("warning: ") else "ok" if ok else "FAILED"
        reporter.line(f"{label:8} {text.removeprefix('warning: ')}")
    return all(ok for ok, _ in results)


@user_errors_fail_task
def check_action(in_deploy=False):
    """`in_deploy`: part of `doit deploy`, where a server that already serves the built
    release needs no more checks (ship will change nothing there); `doit check` checks all.
    Its value `nginx_valid`: the servers where `sudo nginx -t` passed (verify of the same
    `doit deploy` does not run it again)."""
    settings = load_settings()
    record, package = built_package(settings)
    connect_early(settings)
    from scripts.build.package import sha256_file, verify_package
    from scripts.deploy.check import NGINX_VALID, check_server
    from scripts.deploy.fleet import run_parallel
    if sha256_file(package) != record.sha256:
        raise ToolkitError(f"package {package.name}: its sha256 does not match the build record; "
                           f"rebuild it with `doit build`")
    manifest = verify_package(package)
    print(f"ok       package {record.package}: {len(manifest['files'])} files and "
          f"{len(manifest['wheels'])} wheels match their sha256")
    files = [entry["path"] for entry in manifest["files"]]
    for item in settings.migrations_paths:
        if not any(name == item or name.startswith(item + "/") for name in files):
            raise ToolkitError(f"setting MIGRATIONS_PATHS: {item} is not in the package; name "
                               f"the app's migrations, or leave it empty to always migrate")
    verdicts: list[bool] = []
    nginx_valid: list[str] = []

    def check_one(server, reporter):
        with server:
            results = check_server(server, settings, manifest, stop_if_live=in_deploy)
            verdicts.append(_print_results(reporter, results))
            if (True, NGINX_VALID) in results:
                nginx_valid.append(server.name)
            _print_setup_state(server, settings, reporter)
    # Every server is checked before any changes: an unreachable one fails the whole check.
    errors = run_parallel([lambda pair=pair: check_one(*pair) for pair in _servers(settings)],
                          settings.deploy_parallel)
    for error in errors:
        if error:  # an unreachable server: its own line, the one error line comes below
            print(f"{'FAILED':8} {error}")
    healthy = all(verdicts) and not any(errors)
    if not healthy:
        first = next((str(e) for e in errors if e), "see FAILED above")
        raise ToolkitError(f"pre-deploy checks failed ({first.splitlines()[0]}); nothing was "
                           f"changed")
    return {"nginx_valid": sorted(nginx_valid)}


def _print_setup_state(server, settings, reporter) -> None:
    """The provisioning stamp against this server_setup.sh: one line, a warning when behind
    (a deploy still works on a server provisioned by an older script)."""
    from scripts.setup_stamp import server_verdict

    verdict = server_verdict(server, settings)
    if verdict.current:
        reporter.line(f"{'ok':8} {verdict.text}")
    else:
        reporter.line(f"{'warning':8} {verdict.text}; run `doit setup` (SETUP_USER) or "
                      f"server_setup.sh there")


@user_errors_fail_task
def target_action():
    """Ask every server for its Python, architecture and glibc; the build ships wheels for them."""
    settings = load_settings()
    if settings.target_python and settings.target_platform:
        print(f"ok       target Python {settings.target_python} on {settings.target_platform} "
              f"(TARGET_PYTHON, TARGET_PLATFORM)")
        return
    if settings.dry_run:
        print("DRY_RUN=1: the servers' Python is not asked for")
        return
    connect_early(settings)
    from scripts.build.target import ServerFacts, record_fleet_target
    from scripts.deploy.fleet import run_parallel
    facts: list[ServerFacts] = []

    def ask(server, reporter):
        with server:
            if not server.ensure_tool():
                raise ToolkitError(f"{server.name}: {settings.deploy_path} is not set up for "
                                   f"deploys; run `doit setup`")
            state = server.tool_call("probe", str(settings.deploy_path))
            facts.append(ServerFacts(server.name, state["python"], state["machine"],
                                     state.get("glibc", "")))
    errors = run_parallel([lambda pair=pair: ask(*pair) for pair in _servers(settings)],
                          settings.deploy_parallel)
    for error in errors:
        if error:
            raise error
    target, changed = record_fleet_target(settings, sorted(facts, key=lambda f: f.server))
    print(f"{'changed' if changed else 'ok':8} target Python {target['python']} on "
          f"{target['platform']} (what the servers report)")


def _event(settings: Settings, action: str, result: str, release: str, **details) -> Event:
    from scripts.deploy.lock import who
    from scripts.notify import Event
    from scripts.targets import deploy_targets
    hosts = [target.display for target in deploy_targets(settings)]
    return Event(action, result, hosts, release, who(), **details)


@user_errors_fail_task
def ship_action():
    settings = load_settings()
    record, package = built_package(settings)
    connect_early(settings)
    from scripts.deploy.fleet import connected, deploy_fleet
    from scripts.notify import Notifier
    notifier = Notifier(settings)
    started = time.monotonic()
    if settings.dry_run:
        print("DRY_RUN=1: steps and remote commands are printed, nothing runs")
    announced = []

    def announce_once():
        if not announced and not settings.dry_run:
            announced.append(True)
            notifier.send(_event(settings, "deploy", "start", record.release_id,
                                 commit=record.git_commit))
    pairs = list(_servers(settings))
    try:
        with connected([server for server, _ in pairs], settings.deploy_parallel):
            outcomes = deploy_fleet(pairs, settings, record, package, on_start=announce_once)
        for (_, reporter), outcome in zip(pairs, outcomes):
            verb = "deployed" if outcome.changed else "already current"
            if settings.dry_run:
                verb = "would be deployed" if outcome.changed else "already current"
            # Nothing shipped: the release before is this one, and "previous" would only
            # repeat it.
            before = (f" (previous: {outcome.previous or 'none'})"
                      if outcome.changed or outcome.previous != outcome.release else "")
            reporter.line(f"deploy: release {outcome.release} {verb} in {outcome.seconds:.1f} s"
                          f"{before}")
        late = [failure for _, reporter in pairs for failure in reporter.late_failures]
        if late:
            raise ToolkitError("\n".join(late))
    except BaseException as error:
        failed_steps = [r.failed_step for _, r in pairs if r.failed_step]
        notifier.send(_event(settings, "deploy", "failed", record.release_id,
                             commit=record.git_commit, seconds=time.monotonic() - started,
                             step=failed_steps[0] if failed_steps else "",
                             error=(str(error) or type(error).__name__).splitlines()[0]))
        raise
    count = len(pairs)
    if announced:
        notifier.send(_event(settings, "deploy", "ok", record.release_id,
                             commit=record.git_commit, seconds=time.monotonic() - started))
    if settings.dry_run:
        print(f"DRY_RUN=1: nothing was changed; without it, {count} server(s) would go to "
              f"release {record.release_id}")
        return {"shipped": True}
    print(f"deploy: {count} server(s) on release {record.release_id} in "
          f"{time.monotonic() - started:.1f} s")
    # `doit deploy` verifies only what it shipped (doit hands this to _deploy_verify).
    return {"shipped": any(outcome.changed for outcome in outcomes)}


@user_errors_fail_task
def verify_action(shipped=None, nginx_valid=()):
    """`shipped`: in `doit deploy`, whether its ship changed any server (None: `doit verify`);
    `nginx_valid`: the servers where that deploy's check passed `sudo nginx -t` (`doit verify`
    alone runs it everywhere)."""
    from scripts.build.package import BuildRecord, record_path
    from scripts.deploy.verify import verify_server
    from scripts.notify import Notifier
    from scripts.targets import deploy_targets
    settings = load_settings()
    record_file = record_path(settings)
    expected = BuildRecord.read(record_file).release_id if record_file.exists() else ""
    if shipped is False and not settings.dry_run:
        print(f"verify: release {expected} was already live and good; nothing was shipped, so "
              f"there is nothing new to verify (`doit verify` checks it again)")
        return
    connect_early(settings)
    failed, elsewhere, served = [], [], []
    targets = deploy_targets(settings)
    urls = public_urls(settings, targets)
    if settings.dry_run:  # nothing was shipped: what can be checked is what serves now
        print("DRY_RUN=1: verify checks the release that serves now and changes nothing")
    for server, reporter in _servers(settings):
        with server:
            if not server.ensure_tool():
                raise ToolkitError(f"{server.name}: {server.deploy_path} is not set up for "
                                   f"deploys; run `doit setup`, then `doit deploy`")
            current = server.tool_call("probe", str(server.deploy_path))["current"]
            if expected and current != expected and not settings.dry_run:
                # Verifying is not deploying: a release that is not live is not rolled back.
                reporter.line(f"{'FAILED':8} runs release {current or 'none'}, not the built "
                              f"release {expected}")
                elsewhere.append(server.name)
                continue
            release = current if settings.dry_run else expected or current
            served.append(release or "none")
            results = verify_server(server, settings, release, urls.get(server.name, ""),
                                    nginx_checked=server.name in (nginx_valid or ()))
            if not _print_results(reporter, results):
                failed.append(server)
    if elsewhere:
        raise ToolkitError(f"the built release {expected} is not live on "
                           f"{', '.join(elsewhere)}: ship it first (`doit ship`, or `doit "
                           f"deploy`); verify changed nothing")
    if not failed:
        # A dry run verified what serves now: name it (not "release current").
        releases = ", ".join(sorted(set(served))) or expected
        print(f"verify: release {releases} serves on {len(targets)} server(s); "
              f"open {', '.join(urls.values())}")
        return
    if settings.dry_run:
        raise ToolkitError(f"what serves now fails verification on "
                           f"{', '.join(s.name for s in failed)}; DRY_RUN=1, so nothing was "
                           f"rolled back")
    _record_failed_verification(settings, expected, [s.name for s in failed])
    if not settings.auto_rollback:
        raise ToolkitError("verification failed; AUTO_ROLLBACK=0, so the release stays; run "
                           "`doit rollback` to go back")
    notifier = Notifier(settings)
    notifier.send(_event(settings, "deploy", "failed", expected or "current", step="verify",
                         error=f"verification failed on {', '.join(s.name for s in failed)}"))
    # Every server goes back, not only the failed ones: the fleet stays on one release.
    _roll_back(settings, notifier, undo_last_deploy=True)
    raise ToolkitError("verification failed; rolled back to the release that served before")


def _record_failed_verification(settings: Settings, release: str, failed: list[str]) -> None:
    """On every server, the release is no longer good and not shipped again unless forced;
    the history says it failed at verify."""
    from scripts.deploy.deploy import log_entry
    started = time.monotonic()
    error = f"verification failed on {', '.join(failed)}"
    for server, _ in _servers(settings):
        with server:
            served = release or server.tool_call("probe", str(server.deploy_path))["current"]
            server.tool_call("mark-failed", str(server.deploy_path), served)
            server.tool_call("log", str(server.deploy_path), json.dumps(log_entry(
                "verify", served, None, started, "failed", step="verify", error=error)))


def _roll_back(settings: Settings, notifier: Notifier, undo_last_deploy: bool = False) -> None:
    """Roll every server back, in parallel, and tell the team how it went."""
    from scripts.deploy.fleet import run_parallel
    from scripts.deploy.rollback import rollback_server
    started = time.monotonic()
    targets: list[str] = []

    def roll_back_one(server, reporter):
        if undo_last_deploy:
            reporter.line("verification failed: rolling back by itself (AUTO_ROLLBACK=1)")
        with server:
            outcome = rollback_server(server, settings, reporter,
                                      undo_last_deploy=undo_last_deploy)
        targets.append(outcome.release)
        verb = "would serve" if settings.dry_run else "serves"
        reporter.line(f"rollback: {server.name} {verb} release {outcome.release} "
                      f"(was {outcome.previous or 'none'}) after {outcome.seconds:.1f} s")
    target = settings.release
    try:
        errors = run_parallel([lambda pair=pair: roll_back_one(*pair)
                               for pair in _servers(settings)], settings.deploy_parallel)
        target = ", ".join(sorted(set(targets))) or target
        for error in errors:
            if error:
                raise error
    except BaseException as error:
        notifier.send(_event(settings, "rollback", "failed", target or "?",
                             seconds=time.monotonic() - started, step="rollback",
                             error=(str(error) or type(error).__name__).splitlines()[0]))
        raise
    notifier.send(_event(settings, "rollback", "ok", ", ".join(sorted(set(targets))) or "?",
                         seconds=time.monotonic() - started))


@user_errors_fail_task
def rollback_action():
    settings = load_settings()
    connect_early(settings)
    from scripts.notify import Notifier
    _roll_back(settings, Notifier(settings))


@user_errors_fail_task
def restore_action():
    settings = load_settings()
    if not settings.restore_backup:
        raise ToolkitError("setting RESTORE_BACKUP is empty: name the backup to restore (`doit "
                           "backups` lists them), e.g. RESTORE_BACKUP=<name> doit restore")
    connect_early(settings)
    from scripts.deploy.rollback import rollback_server
    for server, reporter in _servers(settings):
        with server:
            outcome = rollback_server(server, settings, reporter, stay_on_current=True)
        verb = "would serve" if settings.dry_run else "serves"
        reporter.line(f"restore: {server.name} {verb} release {outcome.release} with the "
                      f"database of {settings.restore_backup}")


@user_errors_fail_task
def status_action():
    from scripts.deploy import commands, https, maintenance
    from scripts.deploy.lock import describe
    settings = load_settings()
    for server, reporter in _set_up_servers(settings):
        state = server.tool_call("probe", str(server.deploy_path))
        active = server.run(commands.systemctl("is-active", settings.service_name),
                            check=False, reads=True).stdout.strip()
        good = state.get("good", [])
        current = state.get("current")
        previous = good[good.index(current) - 1] if current in good and \
            good.index(current) > 0 else None
        reporter.line(f"service  {settings.service_name}: {active}")
        if settings.https:
            days = https.certificate_days(server, settings)
            reporter.line(f"https    {https.expiry_text(settings, days).removeprefix('HTTPS: ')}")
        reporter.line(f"maintenance {maintenance.describe(maintenance.state(server))}")
        reporter.line(f"current  {current or 'none'}")
        reporter.line(f"previous {previous or 'none'} (what `doit rollback` goes back to)")
        # Good releases in the order they went live, newest first: rollback walks this list.
        reporter.line(f"releases {', '.join(reversed(good)) or 'none'} (good, newest first)")
        failed = state.get("failed", [])
        if failed:
            reporter.line(f"failed   {', '.join(reversed(failed))} (failed verification; "
                          f"FORCE_RELEASE=1 ships one again)")
        # Still on the server and a valid RELEASE, though no plain rollback goes there.
        others = [r for r in state.get("releases", []) if r not in good and r not in failed]
        if others:
            reporter.line(f"others   {', '.join(others)} (rolled back from or never finished; "
                          f"`RELEASE=<id> doit rollback` returns to one)")
        if state.get("lock"):
            reporter.line(f"lock     held by {describe(state['lock'])}")
        history = server.tool_call("history", str(server.deploy_path), 5)["entries"]
        for entry in reversed(history):
            reporter.line(f"{entry.get('time', '?')}  {entry.get('action', '?'):8} "
                          f"{entry.get('release') or '-'}  {_outcome(entry):6} "
                          f"{entry.get('duration_s', 0):6.1f} s  {entry.get('who', '?')}")


def _outcome(entry: dict) -> str:
    """`ok`, or `failed at <step>`: where a failed deploy or rollback stopped."""
    outcome = entry.get("result", "?")
    if outcome == "failed" and entry.get("step"):
        outcome += f" at {entry['step']}"
    return outcome


@user_errors_fail_task
def logs_action():
    from scripts.deploy import commands
    settings = load_settings()
    site = settings.deploy_path.name
    files = ["/var/log/flask_helpdesk/app.log", "/var/log/flask_helpdesk/error.log",
             f"/var/log/nginx/{site}_access.log", f"/var/log/nginx/{site}_error.log"]
    for server, reporter in _servers(settings):
        with server:
            for name in files:
                reporter.line(f"==> {name} <==")
                print(server.sudo(["tail", "-n", "100", name], check=False,
                                  reads=True).stdout.rstrip())
            # sudo allows the deploy user exact journal commands only (no free counts, which
            # could smuggle other journalctl options); say which, since sudo will not.
            reporter.line(f"(on the server: sudo journalctl -u {settings.service_name} "
                          f"--no-pager -n 20|50|100, or -f; other counts are refused)")
            # The migrate and preflight units hold why a release did not start.
            units = commands.units(settings)
            for unit, lines in ((units["app"], 50), (units["migrate"], 30),
                                (units["preflight"], 30)):
                reporter.line(f"==> journalctl -u {unit} <==")
                print(server.sudo(commands.journal(unit, lines), check=False,
                                  reads=True).stdout.rstrip())


@user_errors_fail_task
def history_action():
    """The servers' deploy logs merged into one table, newest first."""
    settings = load_settings()
    rows = []
    for server, _ in _set_up_servers(settings):
        entries = server.tool_call("history", str(server.deploy_path),
                                   settings.history_count)["entries"]
        rows += [(entry, server.name) for entry in entries]
    rows.sort(key=lambda row: row[0].get("time", ""), reverse=True)
    # The commit column fits a 12-digit commit with its -dirty marker (uncommitted changes).
    print(f"{'when (UTC)':25} {'server':12} {'action':8} {'release':13} {'commit':18} "
          f"{'who':22} {'time':>7}  result")
    for entry, host in rows[:settings.history_count]:
        print(f"{entry.get('time', '?'):25} {host:12} {entry.get('action', '?'):8} "
              f"{entry.get('release') or '-':13} {entry.get('git_commit', '') or '-':18} "
              f"{entry.get('who', '?')[:22]:22} {entry.get('duration_s', 0):6.1f}s  "
              f"{_outcome(entry)}")
    if not rows:
        print("no deploys yet")


@user_errors_fail_task
def unlock_action():
    from scripts.deploy.lock import describe
    settings = load_settings()
    for server, reporter in _set_up_servers(settings):
        answer = server.tool_call("unlock", str(server.deploy_path))
        if answer.get("released"):
            reporter.line(f"changed: removed the deploy lock of {describe(answer['holder'])}")
        else:
            reporter.line("ok: no deploy lock was held")


@user_errors_fail_task
def backup_pull_action():
    """Copy the newest backup (or BACKUP) of each server here, every file checked by sha256."""
    import base64
    import hashlib
    settings = load_settings()
    for server, reporter in _set_up_servers(settings):
        answer = server.tool_call("backup-files", str(settings.backup_path), settings.backup)
        backup = Path(answer["backup"])
        target = settings.backup_pull_dir / server.name.replace(":", "_") / backup.name
        if target.is_dir() and all(
                (target / entry["name"]).is_file() and hashlib.sha256(
                    (target / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
                for entry in answer["files"]):
            reporter.line(f"ok: {backup} is already in {target} (sha256 verified)")
            continue
        staged = target.with_name(target.name + ".partial")
        staged.mkdir(parents=True, exist_ok=True)
        for entry in answer["files"]:
            data = base64.b64decode(server.run(["base64", "-w0", str(backup / entry["name"])],
                                               what=f"reading {entry['name']}").stdout)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ToolkitError(f"{server.name}: {backup / entry['name']} arrived with a "
                                   f"different sha256; nothing was kept, run it again")
            (staged / entry["name"]).write_bytes(data)
        staged.chmod(0o700)
        staged.replace(target)
        size = sum(entry["size"] for entry in answer["files"])
        reporter.line(f"changed: {backup} -> {target} ({len(answer['files'])} files, "
                      f"{size / 1e6:.2f} MB, sha256 verified)")


@user_errors_fail_task
def backups_action():
    settings = load_settings()
    for server, reporter in _set_up_servers(settings):
        backups = server.tool_call("backups", str(settings.backup_path))["backups"]
        for backup in backups:
            reporter.line(Path(backup).name)
        if backups:
            reporter.line(f"restore one with: RESTORE_BACKUP={Path(backups[-1]).name} "
                          f"doit restore")
        else:
            reporter.line("no backups yet (a deploy makes one before its migrations)")
