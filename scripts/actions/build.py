"""doit actions of the local and provisioning stages: sandbox, build, setup."""

from __future__ import annotations

from scripts import TOOL_VERSION
from scripts.actions import connect_early, user_errors_fail_task
from scripts.errors import ToolkitError
from scripts.settings import load_settings


@user_errors_fail_task
def sandbox_action(command, servers):
    from scripts.sandbox import sandbox_from_settings
    from scripts.sandbox.commands import run_command

    words = command or ["up"]
    if len(words) != 1 or words[0] not in ("up", "down", "status"):
        raise ToolkitError(f"sandbox: unknown command {' '.join(words)!r}; use "
                           f"`doit sandbox up|down|status`")
    settings = load_settings()
    return run_command(sandbox_from_settings(settings), words[0],
                       servers or settings.sandbox_servers) == 0


@user_errors_fail_task
def sandbox_if_used_action():
    settings = load_settings()
    if not settings.uses_sandbox:
        return
    from scripts.sandbox import sandbox_from_settings
    from scripts.sandbox.commands import run_command
    run_command(sandbox_from_settings(settings), "up", settings.sandbox_servers)


@user_errors_fail_task
def app_check_action():
    """What `doit deploy` checks before it boots or provisions anything: APP_DIR is a folder
    holding a deployable app (requirements.txt, wsgi.py), so a mistyped APP_DIR stops at once.
    The servers' handshakes start first (when they are known: a sandbox may boot later), to
    run while this loads the build's modules and lists the app's files."""
    settings = load_settings()
    if settings.app_dir.is_dir():  # a mistyped APP_DIR stops before any connection
        connect_early(settings)
    from scripts.build.package import check_app
    from scripts.build.sources import shipped_files

    app_dir = settings.app_dir
    check_app(app_dir, shipped_files(app_dir) if app_dir.is_dir() else [])


def _failing_action(error: ToolkitError):
    def report_error():
        raise error
    return user_errors_fail_task(report_error)


def build_task(after: list[str] | None = None) -> dict:
    """The `build` task: file_dep is every shipped file, so nothing changed means nothing runs.
    With `after` (deploy's variant) it runs after those tasks and declares no target, as doit
    lets only one task own a file.

    Listing the shipped files (git ls-files, or a pruned walk) is the one local read a task
    creator does: doit needs file_dep before it can decide anything."""
    from doit.tools import config_changed

    from scripts.build.ignore import IGNORE_FILE
    from scripts.build.package import BuildRecord, record_path
    from scripts.build.sources import shipped_files
    from scripts.build.target import build_target

    try:
        settings = load_settings()
        app_dir = settings.app_dir
        files = shipped_files(app_dir) if app_dir.is_dir() else []
    except ToolkitError as error:
        return {"actions": [_failing_action(error)], "uptodate": [False], "verbosity": 2}
    file_dep = [str(app_dir / name) for name in files]
    if (app_dir / IGNORE_FILE).is_file():
        file_dep.append(str(app_dir / IGNORE_FILE))
    record = record_path(settings)

    def package_still_there_for_the_target():
        # Read when the task runs: `doit target` may have just learned the servers' Python.
        try:
            built = BuildRecord.read(record)
        except (OSError, ValueError, TypeError):
            return False
        wanted = build_target(settings)
        return ((settings.dist_dir / built.package).exists()
                and (built.python, built.platform) == (wanted.target_python,
                                                       wanted.target_platform))

    build_config = {"app_dir": str(app_dir), "max_mb": settings.package_max_mb,
                    "dist_dir": str(settings.dist_dir), "tool": TOOL_VERSION}
    task = {
        "actions": [build_action],
        "file_dep": file_dep,
        "uptodate": [config_changed(build_config), package_still_there_for_the_target],
        "verbosity": 2,
    }
    if after:
        return {**task, "task_dep": after}
    return {**task, "targets": [str(record)], "clean": True}


@user_errors_fail_task
def build_action():
    from scripts.build.package import build_package
    from scripts.build.target import build_target
    from scripts.deploy import hooks
    from scripts.deploy.report import Reporter

    settings = build_target(load_settings())
    reporter = Reporter(dry_run=settings.dry_run)
    for problem in hooks.never_run(settings.app_dir):
        reporter.warning(problem)
    hooks.run_local(settings, "pre-build", reporter)
    record = build_package(settings)
    hooks.run_local(settings, "post-build", reporter, DEPLOY_RELEASE=record.release_id,
                    DEPLOY_PACKAGE=str(settings.dist_dir / record.package))
    print(f"build: release {record.release_id} -> dist/{record.package} (sha256 "
          f"{record.sha256[:12]}…) for Python {settings.target_python} on "
          f"{settings.target_platform}")
    if record.git_commit.endswith("-dirty"):
        import sys
        print(f"warning: {settings.app_dir} has uncommitted changes: release "
              f"{record.release_id} holds them, commit {record.git_commit[:-6]} does not "
              f"(history shows it as {record.git_commit}); commit first to ship what is "
              f"recorded", file=sys.stderr)


def _setup_plan(settings):
    """(setup target, deploy target, server_setup.sh flags) for each server."""
    from scripts.targets import deploy_targets, setup_targets

    return [(setup_target, deploy_target, _flags_for(settings, deploy_target))
            for setup_target, deploy_target in zip(setup_targets(settings),
                                                   deploy_targets(settings))]


def _flags_for(settings, deploy_target) -> list[str]:
    from scripts.provision import setup_flags
    from scripts.targets import deploy_public_key

    public_key = deploy_public_key(settings, deploy_target)
    # The firewall keeps open the port SSH really comes in on: SSH_PORT, the entry's, or
    # the SSH configuration's (a sandbox's forward ends on 22).
    inside_ssh_port = 22 if settings.uses_sandbox else deploy_target.port
    return setup_flags(settings, public_key, inside_ssh_port)


@user_errors_fail_task
def setup_action(check=False):
    import time

    from scripts.provision import provision

    started = time.monotonic()
    settings = load_settings()
    check = check or settings.dry_run  # DRY_RUN=1 doit deploy provisions nothing either
    plan = _setup_plan(settings)
    changed = 0
    for setup_target, deploy_target, flags in plan:
        prefix = f"{setup_target.display}: " if len(plan) > 1 else ""
        print(f"setup: {setup_target.display} as {setup_target.user}"
              f"{' (check only)' if check else ''}")
        changed += provision(setup_target, deploy_target, flags, check, prefix,
                             sudo_password=settings.setup_sudo_password).changed
    verb = "would change" if check else "changed"
    print(f"setup: {len(plan)} server(s), {changed} {verb} in "
          f"{time.monotonic() - started:.1f} s")


@user_errors_fail_task
def setup_if_needed_action():
    """`doit deploy`'s provisioning: the servers' stamps decide, read as the deploy user. Setup
    runs only where a stamp is missing or behind AND SETUP_USER is set (or the sandbox's admin)
    and can log in; elsewhere one warning line, and the deploy goes on. Only a server that was
    never provisioned stops it."""
    import sys

    from scripts.remote import begin_connecting
    from scripts.targets import deploy_targets, setup_targets

    settings = load_settings()
    configured = settings.uses_sandbox or "SETUP_USER" in settings.given
    deploy = deploy_targets(settings)
    # The deploy user's handshakes run while the rest loads (see scripts.remote.MASTERS).
    begin_connecting(deploy, settings.deploy_parallel)
    from scripts.deploy.server import Server
    from scripts.remote import connect
    from scripts.setup_stamp import next_step, server_verdict
    targets = list(zip(deploy, setup_targets(settings)))
    for deploy_target, setup_target in targets:
        name = deploy_target.display
        try:
            with Server(deploy_target, settings.deploy_path) as server:
                verdict = server_verdict(server, settings)
                laid_out = server.run(["test", "-d", str(settings.deploy_path / "releases")],
                                      check=False, reads=True).status == 0
            deploy_reason = ""
        except ToolkitError as error:
            verdict, laid_out, deploy_reason = None, False, str(error)
        if verdict and verdict.current:
            print(f"ok       setup    {name}: {verdict.text}")
            continue
        why = verdict.text if verdict else deploy_reason
        setup_reason = "SETUP_USER is not set"
        if configured:
            try:
                connect(setup_target).close()
                setup_reason = ""
            except ToolkitError as error:
                setup_reason = str(error)
        step = next_step(verdict, laid_out, setup_reason)
        if step == "setup":
            # A new server is the usual case here: its reason, without the advice for a server
            # that should have let deploy in (the setup about to run installs deploy's key).
            reason = why if verdict else f"deploy cannot log in yet: {why.split('; ')[0]}"
            print(f"setup: {name}: {reason}; provisioning as {setup_target.user}")
            _provision_one(settings, setup_target, deploy_target)
        elif step == "warn":
            print(f"warning: {name}: {why}; not provisioning ({setup_reason}); the deploy goes "
                  f"on: run `doit setup` or server_setup.sh there to catch up", file=sys.stderr)
        else:
            state = (f"{why}" if verdict is None else
                     f"{name} is not provisioned ({why}; no {settings.deploy_path}/releases)")
            raise ToolkitError(
                f"{state}; setup cannot run either ({setup_reason}): if {name} is new, run "
                f"server_setup.sh on it (README, step 1), or set SETUP_USER to an account with "
                f"sudo that logs in with its key, then deploy again")


def _provision_one(settings, setup_target, deploy_target) -> None:
    from scripts.provision import provision

    provision(setup_target, deploy_target, _flags_for(settings, deploy_target), settings.dry_run,
              sudo_password=settings.setup_sudo_password)


