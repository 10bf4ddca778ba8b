"""doit actions for check, ship (deploy_to_server), verify, rollback, status, logs, unlock and
backups: they load settings, find the servers, and print what a person needs to read."""

from __future__ import annotations

import time
from pathlib import Path

from scripts.build.package import BuildRecord, record_path, sha256_file, verify_package
from scripts.deploy import commands
from scripts.deploy.check import check_server
from scripts.deploy.deploy import deploy_to_server
from scripts.deploy.report import Reporter
from scripts.deploy.rollback import rollback_server
from scripts.deploy.server import Server
from scripts.deploy.verify import verify_server
from scripts.errors import ToolkitError
from scripts.remote import Target
from scripts.settings import Settings, load_settings
from scripts.targets import deploy_targets
from scripts.tasks import user_errors_fail_task


def built_package(settings: Settings) -> tuple[BuildRecord, Path]:
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
    """Where a person opens the app: the sandbox's forwarded port, or http://host/."""
    if settings.uses_sandbox:
        from scripts.sandbox import sandbox_from_settings
        return {s.name: s.url for s in sandbox_from_settings(settings).servers()}
    return {t.display: f"http://{t.host}/" for t in targets}


def _servers(settings: Settings):
    targets = deploy_targets(settings)
    for target in targets:
        reporter = Reporter(server=target.display, show_server=len(targets) > 1)
        yield Server(target, settings.deploy_path, settings.dry_run, log=reporter.line), reporter


def _print_results(reporter: Reporter, results: list[tuple[bool, str]]) -> bool:
    for ok, text in results:
        reporter.line(f"{'ok' if ok else 'FAILED':8} {text}")
    return all(ok for ok, _ in results)


@user_errors_fail_task
def check_action():
    settings = load_settings()
    record, package = built_package(settings)
    if sha256_file(package) != record.sha256:
        raise ToolkitError(f"package {package.name}: its sha256 does not match the build record; "
                           f"rebuild it with `doit build`")
    manifest = verify_package(package)
    print(f"ok       package {record.package}: {len(manifest['files'])} files and "
          f"{len(manifest['wheels'])} wheels match their sha256")
    healthy = True
    for server, reporter in _servers(settings):
        with server:
            healthy &= _print_results(reporter, check_server(server, settings, manifest))
    if not healthy:
        raise ToolkitError("pre-deploy checks failed (see FAILED above); nothing was changed")


@user_errors_fail_task
def ship_action():
    settings = load_settings()
    record, package = built_package(settings)
    started = time.monotonic()
    if settings.dry_run:
        print("DRY_RUN=1: steps and remote commands are printed, nothing runs")
    count = 0
    for server, reporter in _servers(settings):
        with server:
            outcome = deploy_to_server(server, settings, record, package, reporter)
        count += 1
        verb = "deployed" if outcome.changed else "already current"
        reporter.line(f"deploy: release {outcome.release} {verb} in {outcome.seconds:.1f} s "
                      f"(previous: {outcome.previous})")
    print(f"deploy: {count} server(s) on release {record.release_id} in "
          f"{time.monotonic() - started:.1f} s")


@user_errors_fail_task
def verify_action():
    settings = load_settings()
    record_file = record_path(settings)
    expected = BuildRecord.read(record_file).release_id if record_file.exists() else ""
    failed = []
    targets = deploy_targets(settings)
    urls = public_urls(settings, targets)
    for server, reporter in _servers(settings):
        with server:
            release = expected or server.tool_call("probe", str(server.deploy_path))["current"]
            results = verify_server(server, settings, release, urls.get(server.name, ""))
            if not _print_results(reporter, results):
                failed.append(server)
    if not failed:
        print(f"verify: release {expected or 'current'} serves on {len(targets)} server(s); "
              f"open {', '.join(urls.values())}")
        return
    if not settings.auto_rollback:
        raise ToolkitError("verification failed; AUTO_ROLLBACK=0, so the release stays; run "
                           "`doit rollback` to go back")
    for server, reporter in _servers(settings):
        if server.name in {failed_server.name for failed_server in failed}:
            reporter.line("verification failed: rolling back by itself (AUTO_ROLLBACK=1)")
            with server:
                rollback_server(server, settings, reporter)
    raise ToolkitError("verification failed; rolled back to the previous good release")


@user_errors_fail_task
def rollback_action():
    settings = load_settings()
    for server, reporter in _servers(settings):
        with server:
            outcome = rollback_server(server, settings, reporter)
        reporter.line(f"rollback: {server.name} serves release {outcome.release} "
                      f"(was {outcome.previous}) after {outcome.seconds:.1f} s")


@user_errors_fail_task
def restore_action():
    settings = load_settings()
    if not settings.restore_backup:
        raise ToolkitError("setting RESTORE_BACKUP is empty: name the backup to restore (`doit "
                           "backups` lists them), e.g. RESTORE_BACKUP=<name> doit restore")
    for server, reporter in _servers(settings):
        with server:
            outcome = rollback_server(server, settings, reporter, stay_on_current=True)
        reporter.line(f"restore: {server.name} serves release {outcome.release} with the "
                      f"database of {settings.restore_backup}")


@user_errors_fail_task
def status_action():
    settings = load_settings()
    for server, reporter in _servers(settings):
        with server:
            if not server.ensure_tool():
                reporter.line(f"{settings.deploy_path} is not set up; run `doit setup`")
                continue
            state = server.tool_call("probe", str(server.deploy_path))
            active = server.run(commands.systemctl("is-active", settings.service_name),
                                check=False).stdout.strip()
            good = state.get("good", [])
            current = state.get("current")
            previous = good[good.index(current) - 1] if current in good and \
                good.index(current) > 0 else None
            reporter.line(f"service  {settings.service_name}: {active}")
            reporter.line(f"current  {current}")
            reporter.line(f"previous {previous} (what `doit rollback` goes back to)")
            reporter.line(f"releases {', '.join(state.get('releases', [])) or 'none'} "
                          f"(good: {', '.join(good) or 'none'})")
            if state.get("lock"):
                from scripts.deploy.lock import describe
                reporter.line(f"lock     held by {describe(state['lock'])}")
            history = server.tool_call("history", str(server.deploy_path), 5)["entries"]
            for entry in reversed(history):
                reporter.line(f"{entry['time']}  {entry['action']:8} {entry['release']}  "
                              f"{entry['result']:6} {entry['duration_s']:6.1f} s  {entry['who']}")


@user_errors_fail_task
def logs_action():
    settings = load_settings()
    site = settings.deploy_path.name
    files = ["/var/log/flask_helpdesk/app.log", "/var/log/flask_helpdesk/error.log",
             f"/var/log/nginx/{site}_access.log", f"/var/log/nginx/{site}_error.log"]
    for server, reporter in _servers(settings):
        with server:
            for name in files:
                reporter.line(f"==> {name} <==")
                print(server.sudo(["tail", "-n", "100", name], check=False).stdout.rstrip())
            reporter.line(f"==> journalctl -u {settings.service_name} <==")
            print(server.sudo(commands.journal(settings.service_name, 50),
                              check=False).stdout.rstrip())


@user_errors_fail_task
def unlock_action():
    from scripts.deploy.lock import describe
    settings = load_settings()
    for server, reporter in _servers(settings):
        with server:
            if not server.ensure_tool():
                continue
            answer = server.tool_call("unlock", str(server.deploy_path))
            if answer.get("released"):
                reporter.line(f"changed: removed the deploy lock of {describe(answer['holder'])}")
            else:
                reporter.line("ok: no deploy lock was held")


@user_errors_fail_task
def backups_action():
    settings = load_settings()
    for server, reporter in _servers(settings):
        with server:
            if not server.ensure_tool():
                continue
            backups = server.tool_call("backups", str(settings.backup_path))["backups"]
            for backup in backups:
                reporter.line(Path(backup).name)
            if backups:
                reporter.line(f"restore one with: RESTORE_BACKUP={Path(backups[-1]).name} "
                              f"doit restore")
            else:
                reporter.line("no backups yet (a deploy makes one before its migrations)")
