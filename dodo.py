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


def task_setup():
    """Provision the server(s): server_setup.sh over SSH with the settings (`--check`: dry run)."""
    return {
        "actions": [tasks.setup_action],
        "params": [{"name": "check", "long": "check", "type": bool, "default": False,
                    "help": "report what would change, change nothing"}],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_setup_if_needed():
    """Provision only when the script, templates, settings or servers changed (deploy uses it)."""
    return {"actions": [tasks.setup_action], "uptodate": [tasks.setup_is_current],
            "verbosity": 2}


def task_benchmark():
    """Measure build, sandbox (and later deploy) times; prints a table, writes bench-results.json."""
    return {"actions": [f"{sys.executable} -m scripts.benchmark"], "uptodate": [False],
            "verbosity": 2}
