"""doit actions of day-two operations: maintenance mode (`doit run` is a doit command of its
own, scripts/actions/run_command.py)."""

from __future__ import annotations

from scripts.actions import user_errors_fail_task
from scripts.errors import ToolkitError


@user_errors_fail_task
def maintenance_action(command):
    """`doit maintenance on|off` on every server (one after another); `doit status` shows it."""
    import time

    from scripts.actions.deploy import _set_up_servers
    from scripts.deploy import maintenance
    from scripts.settings import load_settings

    if command not in (["on"], ["off"]):
        given = f"unknown command {' '.join(command)!r}" if command else "on or off is missing"
        raise ToolkitError(f"maintenance: {given}; use `doit maintenance on` or `doit "
                           f"maintenance off`")
    settings = load_settings()
    for server, reporter in _set_up_servers(settings):
        started = time.monotonic()
        if command == ["on"]:
            changed = maintenance.turn_on(server, "doit maintenance on")
            detail = ("nginx answers 503 with Retry-After (the release's maintenance.html, or a "
                      "plain page); the server itself still reaches the app")
        else:
            changed = maintenance.turn_off(server)
            detail = "nginx passes every request to the app"
        reporter.line(f"{reporter.verdict(changed):8} {'maintenance':11} "
                      f"{time.monotonic() - started:5.2f} s  {command[0]}: {detail}")
