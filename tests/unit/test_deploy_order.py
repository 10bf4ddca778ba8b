"""`doit deploy` checks the app before it boots a sandbox or provisions a server: a mistyped
APP_DIR is one error line, with nothing started or set up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scripts.settings import REPO_ROOT


@pytest.mark.parametrize("make_app, expected", [
    (lambda path: path / "typo", "error: setting APP_DIR="),
    (lambda path: path, "has no requirements.txt"),
])
def test_deploy_checks_app_dir_before_any_server_is_touched(tmp_path, make_app, expected):
    env = {key: value for key, value in os.environ.items()
           if key not in ("SSH_AUTH_SOCK", "DRY_RUN")}
    # A server nothing listens on: had setup or target run first, their error would come first.
    env.update(ENV_FILE=str(tmp_path / "none.env"), APP_DIR=str(make_app(tmp_path)),
               DEPLOY_SERVER="127.0.0.1:9", SSH_KNOWN_HOSTS_FILE=str(tmp_path / "known_hosts"))
    result = subprocess.run([sys.executable, "-m", "doit", "--db-file", str(tmp_path / "doit.db"),
                             "deploy"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines()
                                          if line.startswith("error:")]
    assert len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr
    assert "setup" not in result.stdout and "sandbox" not in result.stdout, result.stdout
