"""doit actions: thin adapters from doit's calling convention to the toolkit's modules. dodo.py
only wires them into tasks; this package is their one home.

A doit python-action fails the task by returning False; user-facing errors are printed as one
`error:` line without a traceback, and the reporter (scripts.actions.reporter) adds nothing."""

from __future__ import annotations

import functools
import sys

from scripts.errors import ToolkitError


def user_errors_fail_task(action):
    """Turn a ToolkitError into `error:` lines on stderr and a failed task that doit reports
    no further (no traceback, no `returned False`). An action that returns False has printed
    its own error line."""
    @functools.wraps(action)
    def wrapper(*args, **kwargs):
        from scripts.actions.reporter import ReportedFailure
        try:
            result = action(*args, **kwargs)
        except ToolkitError as error:
            for line in str(error).splitlines():
                print(f"error: {line}", file=sys.stderr)
            return ReportedFailure()
        except Exception as error:  # noqa: BLE001 - a bug: one line a user can quote in a report
            print(f"error: {action.__name__.removesuffix('_action')}: unexpected "
                  f"{type(error).__name__}: {error}; this is a bug in the toolkit, please "
                  f"report it with this line", file=sys.stderr)
            return ReportedFailure()
        # A dict is what doit saves as the task's values (read back by uptodate callables).
        if isinstance(result, dict):
            return result
        return ReportedFailure() if result is False else True
    return wrapper




def connect_early(settings) -> None:
    """Start the servers' SSH handshakes now, in the background (scripts.remote.MASTERS), so
    that the action's imports and file reads overlap them. Only a head start: whatever goes
    wrong here happens again, and is reported as always, where the action connects."""
    from scripts.remote import begin_connecting
    from scripts.targets import deploy_targets
    try:
        begin_connecting(deploy_targets(settings), settings.deploy_parallel)
    except Exception:  # noqa: BLE001 - see above
        pass
