"""Task graph of the Flask deploy toolkit. `doit list` shows the tasks; `doit help TASK` their options.

Task creators only wire things together: every connection, file read and remote command happens
inside actions (scripts/), so `doit list` is instant and never touches a server."""

import sys

from doit import create_after

from scripts.actions import build as tasks
from scripts.actions import day_two
from scripts.actions import deploy as actions
from scripts.actions.reporter import ToolkitReporter

DOIT_CONFIG = {
    "default_tasks": ["build"],
    "verbosity": 2,
    "backend": "json",
    "dep_file": ".doit.db",
    "reporter": ToolkitReporter,
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


# The build's creator lists APP_DIR's files (git, the ignore rules) for its file_dep: made only
# when a run reaches the build (create_after), not on every `doit rollback` or `doit status`.
@create_after()
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
    """Provision where the server's stamp is missing or behind and SETUP_USER can (deploy uses it)."""
    return {**_every_time(tasks.setup_if_needed_action), "task_dep": ["sandbox_if_used"]}


def task_embed_templates():
    """Write conf/'s templates into server_setup.sh (it runs alone on a server); run after editing conf/."""
    return {**_every_time(f"{sys.executable} -m scripts.embed_templates"),
            "basename": "embed-templates"}


def task_sandbox_if_used():
    """Start the sandbox server when DEPLOY_SERVER is unset (reuses a running one)."""
    return _every_time(tasks.sandbox_if_used_action)


def task_target():
    """Ask the servers for their Python and platform; the next build ships wheels for them."""
    return _every_time(actions.target_action)


def task_check():
    """pre_deploy_checks: package integrity, SSH and host key, sudo, disk, Python, nginx, lock."""
    return _every_time(actions.check_action)


def task_ship():
    """deploy_to_server: upload, unpack, venv, migrate, preflight, switch, zero-downtime restart."""
    return _every_time(actions.ship_action)


def task_verify():
    """post_deploy_verification: health, nginx, the guide's commands; rolls back on failure."""
    return _every_time(actions.verify_action)


def task_deploy():
    """Build, provision if needed, check, ship and verify: the whole deploy in one command."""
    return {"actions": None, "task_dep": ["_deploy_app", "_deploy_verify"]}


# Each stage task above does only its stage; `deploy` chains them through these private tasks
# (doit list hides names that start with "_"), so `doit verify` never ships anything.
def task__deploy_app():
    """APP_DIR holds a deployable app: checked first, before a sandbox boots or a server is set up."""
    return _every_time(tasks.app_check_action)


def task__deploy_target():
    """target, once the servers are provisioned: their Python and platform."""
    return {**_every_time(actions.target_action), "task_dep": ["setup_if_needed"]}


@create_after(executed="_deploy_target")
def task__deploy_build():
    """The build, after the servers were asked (`doit build` alone asks no server)."""
    # doit starts every ready dependency at once: only a task_dep orders the build after target.
    return tasks.build_task(after=["_deploy_target"])


def task__deploy_check():
    """check, once the package is built for the servers, which are provisioned."""
    return {**_every_time((actions.check_action, [], {"in_deploy": True})),
            "task_dep": ["_deploy_build"]}


def task__deploy_ship():
    """ship, once check passed."""
    return {**_every_time(actions.ship_action), "task_dep": ["_deploy_check"]}


def task__deploy_verify():
    """verify, once ship finished."""
    return {**_every_time(actions.verify_action), "task_dep": ["_deploy_ship"],
            "getargs": {"shipped": ("_deploy_ship", "shipped"),
                        "nginx_valid": ("_deploy_check", "nginx_valid")}}


def task_rollback():
    """rollback_deployment: back to the previous good release (RELEASE=<id> to choose one)."""
    return _every_time(actions.rollback_action)


def task_restore():
    """Restore the database backup RESTORE_BACKUP under the current release (health-gated)."""
    return _every_time(actions.restore_action)


def task_status():
    """Current and previous releases, service state, the last deploys."""
    return _every_time(actions.status_action)


def task_history():
    """The last deploys and rollbacks of every server, newest first (HISTORY_COUNT)."""
    return _every_time(actions.history_action)


def task_logs():
    """The app's and nginx's logs and the service journal (last lines)."""
    return _every_time(actions.logs_action)


def task_unlock():
    """Remove a deploy lock left by a deploy that died (prints who held it)."""
    return _every_time(actions.unlock_action)


def task_backups():
    """List the database backups on the server(s), newest last."""
    return _every_time(actions.backups_action)


def task_backup_pull():
    """Copy the newest backup (BACKUP=<name> for another) here, verified by sha256."""
    return {**_every_time(actions.backup_pull_action), "basename": "backup-pull"}


def task_maintenance():
    """Maintenance mode: `doit maintenance on|off`; nginx answers 503 (the app's maintenance.html)."""
    return {**_every_time(day_two.maintenance_action), "pos_arg": "command"}


def task_benchmark():
    """Measure build, sandbox, server and fleet times; prints a table, writes bench-results.json."""
    return _every_time(f"{sys.executable} -m scripts.benchmark")


def _every_time(action) -> dict:
    """A task that runs its action on every call: its state lives on the servers, not here."""
    return {"actions": [action], "uptodate": [False], "verbosity": 2}
