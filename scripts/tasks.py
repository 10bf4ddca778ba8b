"""doit actions: thin adapters from doit's calling convention to the toolkit's modules.

A doit python-action fails the task by returning False; user-facing errors are printed as one
line without a traceback."""

from __future__ import annotations

import functools
import sys

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
