"""doit actions: thin adapters from doit's calling convention to the toolkit's modules.

A doit python-action fails the task by returning False; user-facing errors are printed as one
line without a traceback."""

from __future__ import annotations

import functools
import sys

from scripts import TOOL_VERSION
from scripts.errors import ToolkitError
from scripts.settings import load_settings


def user_errors_fail_task(action):
    """Turn a ToolkitError into one line on stderr and a failed task (no traceback)."""
    @functools.wraps(action)
    def wrapper(*args, **kwargs):
        try:
            result = action(*args, **kwargs)
        except ToolkitError as error:
            for line in str(error).splitlines():
                print(f"error: {line}", file=sys.stderr)
            return False
        return result is not False
    return wrapper


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


def _failing_action(error: ToolkitError):
    def report_error():
        raise error
    return user_errors_fail_task(report_error)


def build_task() -> dict:
    """The `build` task: file_dep is every shipped file, so nothing changed means nothing runs.

    Listing the shipped files (git ls-files, or a pruned walk) is the one local read a task
    creator does: doit needs file_dep before it can decide anything."""
    from doit.tools import config_changed

    from scripts.build.ignore import IGNORE_FILE
    from scripts.build.package import BuildRecord, record_path
    from scripts.build.sources import shipped_files

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

    def package_still_there():
        try:
            return (settings.dist_dir / BuildRecord.read(record).package).exists()
        except (OSError, ValueError, TypeError):
            return False

    build_config = {"app_dir": str(app_dir), "python": settings.target_python,
                    "platform": settings.target_platform, "max_mb": settings.package_max_mb,
                    "dist_dir": str(settings.dist_dir), "tool": TOOL_VERSION}
    return {
        "actions": [build_action],
        "file_dep": file_dep,
        "targets": [str(record)],
        "uptodate": [config_changed(build_config), package_still_there],
        "clean": True,
        "verbosity": 2,
    }


@user_errors_fail_task
def build_action():
    from scripts.build.package import build_package

    record = build_package(load_settings())
    print(f"build: release {record.release_id} -> dist/{record.package} (sha256 "
          f"{record.sha256[:12]}…)")
