"""A new user's first hour (issue #15): dry runs plan from the server's real state, each stage
task does only its stage, and every failure is one `error:` line with nothing from doit or
Python after it. Real doit, real sandbox server."""

from __future__ import annotations

import re
import socket

import pytest

from tests.integration.helpers import doit

STEP_LINE = re.compile(r"^(would change|changed|ok)\s+(\w+)\s+\d+\.\d+ s")
INTERNALS = ("Traceback", "Python Task failed", "TaskFailed", "TaskError", "<function",
             "returned False", "None")


def steps(output: str) -> list[tuple[str, str]]:
    """(step, verdict) of every step line, a dry run's `would change` read as `changed`."""
    found = []
    for line in output.splitlines():
        match = STEP_LINE.match(line)
        if match:
            verdict = "changed" if match.group(1) == "would change" else match.group(1)
            found.append((match.group(2), verdict))
    return found


def assert_one_error_line(result, *words: str) -> str:
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode != 0, output
    assert len(errors) == 1, output
    for leak in INTERNALS:
        assert leak not in output, output
    for word in words:
        assert word in errors[0], output
    return errors[0]


def test_a_dry_run_plans_from_the_server_and_the_real_run_then_does_exactly_that(site):
    assert site.deploy().returncode == 0
    before = site.served_release()
    site.change_code("dry run plan")
    assert site.doit("-s", "build").returncode == 0
    env_file = site.work / "plan.env"  # a changed app environment: `shared` would change
    env_file.write_text("SECRET_KEY=planned-secret\n")
    plan = site.doit("-s", "ship", DRY_RUN="1", APP_ENV_FILE=str(env_file))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert site.served_release() == before, "a dry run changed what serves"
    assert "None" not in plan.stdout + plan.stderr
    real = site.doit("-s", "ship", APP_ENV_FILE=str(env_file))
    assert real.returncode == 0, real.stdout + real.stderr
    assert steps(plan.stdout) == steps(real.stdout), plan.stdout + "\n----\n" + real.stdout
    # The server's state shows in the plan: the venv is reused, the database is backed up.
    assert ("venv", "ok") in steps(plan.stdout) and ("backup", "changed") in steps(plan.stdout)
    assert f"(was {before})" in plan.stdout
    again = site.doit("-s", "ship", DRY_RUN="1")
    assert "already current" in again.stdout and steps(again.stdout) == []
    # A rollback's plan too: back to `before`, step by step as the real rollback then does.
    plan = site.doit("rollback", DRY_RUN="1")
    assert plan.returncode == 0 and site.served_release() != before, plan.stdout + plan.stderr
    real = site.doit("rollback")
    assert real.returncode == 0, real.stdout + real.stderr
    assert steps(plan.stdout) == steps(real.stdout) != [], plan.stdout + "\n----\n" + real.stdout
    assert site.served_release() == before


@pytest.mark.parametrize("task", ["check", "status", "history", "rollback", "verify", "logs"])
def test_every_read_and_plan_task_works_with_dry_run_and_changes_nothing(site, task):
    if site.doit("-s", "status").returncode != 0 or "previous none" in site.doit(
            "-s", "status").stdout:
        site.change_code(f"second release for {task}")
        assert site.deploy().returncode == 0
    serving = site.served_release()
    result = site.doit("-s", task, DRY_RUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error:" not in result.stdout + result.stderr
    assert site.served_release() == serving


def test_stage_tasks_do_only_their_stage(site, tmp_path):
    assert site.deploy().returncode == 0
    serving = site.served_release()
    site.change_code("not built yet")
    # verify checks what serves: it neither builds nor ships the changed code.
    verify = site.doit("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert site.served_release() == serving
    assert ".  build" not in verify.stdout and ".  ship" not in verify.stdout
    # check without a package says so; it builds nothing and provisions nothing.
    empty_dist = tmp_path / "dist"
    check = site.doit("check", DIST_DIR=str(empty_dist))
    assert_one_error_line(check, "no package built", "doit build")
    assert not empty_dist.exists() or not any(empty_dist.iterdir())
    assert ".  setup" not in check.stdout
    # verify of a built release that is not live says so and rolls nothing back.
    assert site.doit("-s", "build").returncode == 0
    history = site.doit("history").stdout
    unshipped = site.doit("verify")
    assert_one_error_line(unshipped, site.built_release(), "not live", "doit ship")
    assert site.served_release() == serving and site.doit("history").stdout == history
    # DRY_RUN=1 doit deploy plans every stage and changes nothing.
    dry = site.doit("deploy", DRY_RUN="1")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would change" in dry.stdout and site.served_release() == serving
    # deploy alone chains build, check, ship and verify.
    deploy = site.doit("deploy")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert site.served_release() == site.built_release() != serving


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SERVER_TASKS = ["setup", "check", "ship", "verify", "deploy", "rollback", "restore", "status",
                "history", "logs", "unlock", "backups"]


@pytest.mark.parametrize("task", SERVER_TASKS)
def test_every_task_that_cannot_reach_its_server_prints_one_error_line_and_nothing_else(
        site, tmp_path, task):
    settings = {"DEPLOY_SERVER": "127.0.0.1", "SSH_PORT": str(_closed_port()),
                "SSH_KEY_FILE": str(site.sandbox.deploy_key_file),
                "SSH_KNOWN_HOSTS_FILE": str(site.sandbox.known_hosts_file),
                "RESTORE_BACKUP": "20260101T000000000000Z-abc"}
    assert site.doit("-s", "build").returncode == 0
    result = doit(site.work, site.sandbox.state_dir, task, **{**site.settings, **settings})
    assert_one_error_line(result)


@pytest.mark.parametrize("task, settings, words", [
    ("build", {"APP_DIR": "/nonexistent/app"}, ["APP_DIR"]),
    ("check", {"KEEP_RELEASE": "3"}, ["KEEP_RELEASE", "KEEP_RELEASES"]),
    ("deploy", {"DEPLOY_SEVRER": "web-1.example.com"}, ["DEPLOY_SEVRER", "DEPLOY_SERVER"]),
    ("sandbox", {"SANDBOX_SERVERS": "zero"}, ["SANDBOX_SERVERS"]),
])
def test_bad_settings_fail_every_task_with_one_error_line_naming_the_setting(
        site, task, settings, words):
    assert_one_error_line(site.doit(task, **settings), *words)


@pytest.mark.parametrize("edit, words", [
    (lambda text: text + "\nimport markdown\n",
     ["ModuleNotFoundError: No module named 'markdown'", "helpdesk/views.py, line",
      "requirements.txt", "old release keeps serving"]),
    (lambda text: text + "\ndef broken(:\n    pass\n",
     ["SyntaxError", "helpdesk/views.py, line", "old release keeps serving"]),
])
def test_an_app_that_cannot_import_is_explained_by_its_exception_file_and_line(
        site, edit, words):
    assert site.deploy().returncode == 0
    serving = site.served_release()
    with site.edited("helpdesk/views.py", edit):
        result = site.ship()
    assert_one_error_line(result, *words)
    assert site.served_release() == serving
    logs = site.doit("-s", "logs")
    assert logs.returncode == 0 and words[0] in logs.stdout, logs.stdout + logs.stderr


@pytest.mark.parametrize("edit, settings, answer, setting", [
    (lambda text: text.replace('    release = current_app.config["RELEASE_ID"]\n',
                               '    raise RuntimeError("broken health")\n', 1), {}, "HTTP 500",
     "(HEALTH_TIMEOUT_S=600)"),
    # A 404 names HEALTH_PATH: an app of one's own answers health elsewhere (/health, /ping).
    (lambda text: text, {"HEALTH_PATH": "/no-such-page"}, "HTTP 404",
     "(HEALTH_PATH=/no-such-page: is it a route of the app?)"),
])
def test_a_health_check_answering_an_error_fails_at_once_and_the_old_release_serves(
        site, edit, settings, answer, setting):
    assert site.deploy().returncode == 0
    serving = site.served_release()
    site.change_code(f"health answers {answer}")
    with site.edited("helpdesk/views.py", edit):
        result = site.ship(HEALTH_TIMEOUT_S="600", **settings)
    line = assert_one_error_line(result, answer, "waiting would not change it", setting,
                                 "old release keeps serving")
    assert "preflight" in line or "new release" in line
    assert site.served_release() == serving


def test_a_release_that_failed_verification_is_recorded_failed_and_not_shipped_again(site):
    assert site.deploy().returncode == 0
    good = site.served_release()
    broken_home = lambda text: text.replace(  # noqa: E731 - healthz answers, / does not
        '@bp.get("/")\ndef index():\n', '@bp.get("/")\ndef index():\n    abort(500)\n')
    with site.edited("helpdesk/views.py", broken_home):
        first = site.deploy()
        broken = site.built_release()
        assert first.returncode != 0 and "rolling back by itself" in first.stdout
        assert site.served_release() == good
        history = site.doit("history").stdout
        assert any(f" verify   {broken}" in line and line.endswith("failed at verify")
                   for line in history.splitlines()), history
        status = site.doit("status").stdout
        assert f"failed   {broken}" in status and f"releases {good}" in status, status
        assert f"verify   {broken}  failed at verify" in status, status
        again = site.doit("-s", "ship")
        assert_one_error_line(again, broken, "failed verification before", "FORCE_RELEASE=1")
        assert site.served_release() == good
        forced = site.doit("-s", "ship", FORCE_RELEASE="1")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert site.served_release() == broken
    assert site.deploy().returncode == 0
    assert site.served_release() == good


def test_rollback_takes_a_unique_release_prefix_and_a_wrong_one_lists_the_releases(site):
    assert site.deploy().returncode == 0
    older = site.served_release()
    site.change_code("newer, for a rollback by prefix")
    assert site.deploy().returncode == 0
    newer = site.served_release()
    history_before = site.doit("history").stdout
    wrong = site.doit("rollback", RELEASE="zzzz")
    line = assert_one_error_line(wrong, "RELEASE=zzzz", newer, older)
    assert "preflight" not in line
    assert site.doit("history").stdout == history_before, "a wrong RELEASE was logged"
    rolled = site.doit("rollback", RELEASE=older[:6])
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert site.served_release() == older


def test_the_ssh_command_the_sandbox_prints_logs_in_after_setup(site):
    import shlex
    import subprocess

    from scripts.sandbox import describe

    printed = describe(site.server, site.sandbox)
    argv = shlex.split(printed.split(": ", 1)[1].split("   http:")[0])
    result = subprocess.run([argv[0], "-o", "BatchMode=yes", *argv[1:], "sudo", "-n", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, printed + "\n" + result.stderr


def test_logs_say_which_journal_commands_sudo_allows_and_they_are_exactly_those(site):
    logs = site.doit("logs")
    assert logs.returncode == 0
    assert "sudo journalctl -u flask-helpdesk --no-pager -n 20|50|100, or -f" in logs.stdout
    with site.deploy_user() as machine:
        sudo = machine["sudo"]
        for count in ("20", "50", "100"):
            sudo["-n", "journalctl", "-u", "flask-helpdesk", "--no-pager", "-n", count]()
        refused = sudo["-n", "journalctl", "-u", "flask-helpdesk", "--no-pager", "-n", "3"].run(
            retcode=None)
        assert refused[0] != 0


def test_uncommitted_changes_are_warned_of_and_history_keeps_its_columns(site, tmp_path):
    import subprocess

    from tests.build.conftest import copy_app

    app = copy_app(tmp_path / "app")
    git = ["git", "-C", str(app), "-c", "user.email=dev@example.com", "-c", "user.name=dev"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "app"], check=True)
    views = app / "helpdesk" / "views.py"
    views.write_text(views.read_text() + "\n# not committed\n")
    build = site.doit("-s", "build", APP_DIR=str(app))
    assert build.returncode == 0
    assert "warning:" in build.stderr and "uncommitted changes" in build.stderr
    assert site.doit("-s", "ship", APP_DIR=str(app)).returncode == 0
    history = site.doit("history").stdout.splitlines()
    header = next(line for line in history if line.startswith("when (UTC)"))
    row = next(line for line in history if "-dirty" in line)
    start = header.index("who")  # the who column starts where its heading does
    assert row[start - 1] == " " != row[start], (header, row)
    assert site.deploy().returncode == 0  # back to the module's own app
