"""Pure parts of day-two operations: root's runner (conf/app-run.py, loaded as setup renders
it), the remote command of `doit run`, the hooks a package ships."""

from __future__ import annotations

import importlib.util
import io
import os
import pwd
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scripts.deploy import hooks
from scripts.deploy.run import remote_command
from scripts.settings import REPO_ROOT, load_settings

SETUP = REPO_ROOT / "server_setup.sh"


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """The runner exactly as server_setup.sh installs it, with the default settings."""
    rendered = subprocess.run(
        ["bash", "-c", f"source {SETUP}; CONF_DIR={REPO_ROOT / 'conf'}; "
                       f"SITE_NAME=flask_helpdesk; render_template app-run.py"],
        capture_output=True, text=True, check=True).stdout
    path = tmp_path_factory.mktemp("runner") / "app_run.py"
    path.write_text(rendered)
    spec = importlib.util.spec_from_file_location("app_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_runner_carries_every_hardening_property_of_the_service(runner):
    hardening = [line for line in (REPO_ROOT / "conf" / "hardening.conf").read_text()
                 .replace("@DEPLOY_PATH@", "/var/www/flask_helpdesk")
                 .replace("@DATA_PATH@", "/var/lib/flask-helpdesk")
                 .replace("@LOG_PATH@", "/var/log/flask_helpdesk").splitlines()
                 if line and not line.startswith("#")]
    argv = runner.argv_for("--pipe", "current", ["flask", "shell"], 33, 33)
    assert [arg.removeprefix("--property=") for arg in argv
            if arg.removeprefix("--property=") in hardening] == hardening
    assert "--property=NoNewPrivileges=yes" in argv and "--uid=33" in argv
    assert "--working-directory=/var/www/flask_helpdesk/current" in argv
    assert argv[-5:] == ["--", "/usr/bin/env", "--", "flask", "shell"]
    assert not any(arg.startswith("--property=#") for arg in argv)


def test_the_runner_passes_dollars_literally_and_names_releases_not_paths(runner):
    argv = runner.argv_for("--pty", "4e85b8eeaa51", ["echo", "$HOME", "5$"], 33, 33)
    assert argv[-2:] == ["$$HOME", "5$$"]
    assert "--working-directory=/var/www/flask_helpdesk/releases/4e85b8eeaa51" in argv
    assert "--setenv=PATH=/var/www/flask_helpdesk/releases/4e85b8eeaa51/.venv/bin:/usr/bin:/bin" \
        in argv


@pytest.mark.parametrize("args", [[], ["--pipe", "current", "--"], ["--uid=0", "current", "--", "id"],
                                  ["--pipe", "..", "--", "id"], ["--pipe", "../x", "--", "id"],
                                  ["--pipe", "/root", "--", "id"],
                                  ["--pipe", "current", "-p", "User=root", "--", "id"]])
def test_the_runner_refuses_anything_but_its_own_arguments(runner, args, monkeypatch, capsys):
    monkeypatch.setattr(runner.os, "execv", lambda *a: pytest.fail(f"ran {a}"))
    assert runner.main(args) == 2
    assert capsys.readouterr().err.startswith("usage: flask-helpdesk-run ")


def test_the_runner_refuses_a_root_app_user(runner, monkeypatch, capsys):
    monkeypatch.setattr(runner.os, "execv", lambda *a: pytest.fail(f"ran {a}"))
    monkeypatch.setattr(runner.pwd, "getpwnam", lambda name: pwd.getpwuid(0))
    assert runner.main(["--pipe", "current", "--", "id"]) == 2
    assert "refusing to run as root" in capsys.readouterr().err


def test_run_quotes_the_command_for_the_login_shell():
    settings = load_settings(env_file=Path("/nonexistent"), environ={})
    line = remote_command(settings, ["sh", "-c", "echo $HOME; rm -rf /"], tty=False)
    assert ("exec sudo -n /usr/local/sbin/flask-helpdesk-run --pipe current -- sh -c "
            + shlex.quote("echo $HOME; rm -rf /")) in line
    assert "--pty current" in remote_command(settings, ["bash"], tty=True)


def test_a_package_ships_the_executable_server_hooks_only(tmp_path):
    package = tmp_path / "app.tar.gz"
    with tarfile.open(package, "w:gz") as tar:
        for name, mode in (("deploy-hooks/pre-switch", 0o755), ("deploy-hooks/post-switch", 0o644),
                           ("deploy-hooks/pre-build", 0o755), ("deploy-hooks/other", 0o755),
                           ("wsgi.py", 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = 3, mode
            tar.addfile(info, io.BytesIO(b"#!\n"))
    assert hooks.shipped(package, "r1") == {"pre-switch"}


def test_hooks_that_would_never_run_are_named_with_what_to_do(tmp_path):
    # The two ways a newcomer's hook silently never runs: no executable bit, or a name that is
    # no hook's (post-deploy). A helper script beside the hooks, not executable, is fine.
    folder = tmp_path / "deploy-hooks"
    folder.mkdir()
    for name, mode in (("post-migrate", 0o644), ("post-deploy", 0o755), ("pre-switch", 0o755),
                       ("common.sh", 0o644)):
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(mode)
    assert hooks.never_run(tmp_path) == [
        "deploy-hooks/post-deploy is no hook's name, so it never runs; hooks are pre-build, "
        "post-build, pre-migrate, post-migrate, pre-switch, post-switch",
        "deploy-hooks/post-migrate is not executable, so it never runs; `chmod +x` it (and "
        "commit that)"]
    assert hooks.never_run(tmp_path / "no-app") == []


def test_doit_run_without_the_dashes_says_the_command_goes_after_them(tmp_path):
    # `doit run flask --app wsgi routes`: doit alone would answer "Must be a task, or a target".
    result = subprocess.run([str(Path(sys.executable).parent / "doit"), "run", "flask", "--app",
                             "wsgi", "routes"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "ENV_FILE": os.devnull}, timeout=60)
    assert result.returncode == 3
    assert result.stderr == ("error: flask is not a task; a command for the server goes after "
                             "`--`: doit run -- flask --app wsgi routes\n")


@pytest.mark.parametrize("command, said", [([], "on or off is missing"),
                                           (["of"], "unknown command 'of'")])
def test_maintenance_without_on_or_off_is_one_error_line(command, said, capsys):
    from scripts.actions.day_two import maintenance_action

    from scripts.actions.reporter import ReportedFailure

    assert isinstance(maintenance_action(command), ReportedFailure)
    assert capsys.readouterr().err == (f"error: maintenance: {said}; use `doit maintenance on` "
                                       f"or `doit maintenance off`\n")
