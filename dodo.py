"""Task graph of the Flask deploy toolkit. `doit list` shows the tasks; `doit help TASK` their options.

Task creators only wire things together: every connection, file read and remote command happens
inside actions (scripts/), so `doit list` is instant and never touches a server."""

import sys

from scripts import tasks

DOIT_CONFIG = {
    "default_tasks": ["build"],
    "verbosity": 2,
    "backend": "json",
    "dep_file": ".doit.db",
}


def task_sandbox():
    """Local sandbox servers: `doit sandbox [up|down|status] [-n N]` (default: up)."""
    return {
        "actions": [tasks.sandbox_action],
        "params": [{"name": "servers", "short": "n", "long": "servers", "type": int,
                    "default": 0, "help": "how many servers (default: SANDBOX_SERVERS, 1)"}],
        "pos_arg": "command",
        "uptodate": [False],
    }


def task_build():
    """Build dist/<app>-<release>.tar.gz from APP_DIR: sources, wheels, manifest (only on change)."""
    return tasks.build_task()


def task_benchmark():
    """Measure build, sandbox (and later deploy) times; prints a table, writes bench-results.json."""
    return {"actions": [f"{sys.executable} -m scripts.benchmark"], "uptodate": [False],
            "verbosity": 2}
