"""What every doit run pays before its first remote call: the modules it loads, and how its
SSH handshake is waited for. Timings live in scripts/benchmark.py; these tests guard the causes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from scripts import remote
from scripts.errors import ToolkitError
from scripts.remote import Target
from scripts.settings import REPO_ROOT
from tests.unit.test_remote import closed_port

# Loaded by `doit rollback` before it connects, they would cost it ~0.1 s each (requests,
# plumbum), or be loaded for nothing (the build's file listing: pathspec, tarfile).
HEAVY = ("requests", "plumbum", "pathspec", "tarfile", "scripts.build.package")

LOADED = """
import json, sys
import dodo
from doit.loader import load_tasks
# What `doit rollback` (any command that runs tasks) does with dodo.py: delayed creators wait.
tasks = load_tasks(vars(dodo), allow_delayed=True)
import scripts.actions.deploy, scripts.deploy.rollback, scripts.deploy.fleet, scripts.targets
print(json.dumps({"heavy": [name for name in %r if name in sys.modules],
                  "tasks": sorted(task.name for task in tasks)}))
""" % (HEAVY,)


def test_loading_the_tasks_and_the_rollback_path_loads_no_heavy_module(tmp_path):
    env = {**os.environ, "ENV_FILE": os.devnull, "APP_DIR": str(tmp_path / "app"),
           "DIST_DIR": str(tmp_path / "dist")}
    result = subprocess.run([sys.executable, "-c", LOADED], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["heavy"] == []
    # The build tasks are still there, to be made when a run reaches them.
    assert {"build", "_deploy_build", "rollback"} <= set(loaded["tasks"])


def test_doit_list_still_shows_the_build_and_builds_it_on_its_own(tmp_path):
    """The delayed build creator: `doit list` names it; `doit build` makes and runs it."""
    env = {**os.environ, "ENV_FILE": os.devnull, "APP_DIR": str(tmp_path / "missing"),
           "DIST_DIR": str(tmp_path / "dist")}
    doit = [sys.executable, "-m", "doit", "-f", str(REPO_ROOT / "dodo.py"), "--dir",
            str(tmp_path)]
    listed = subprocess.run([*doit, "list"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:1] == ["build"] for line in listed.stdout.splitlines())
    built = subprocess.run([*doit, "build"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
    # The creator ran when the run reached the build: its error names APP_DIR.
    assert built.returncode != 0
    assert "APP_DIR" in built.stderr and str(tmp_path / "missing") in built.stderr


def test_a_process_that_outlasts_its_wait_is_killed():
    process = subprocess.Popen(["sleep", "30"])
    started = time.monotonic()
    assert remote._wait(process, 0.2) is None
    assert time.monotonic() - started < 5
    assert process.poll() is not None


def test_a_handshake_started_early_is_the_one_the_session_waits_for(monkeypatch):
    """MASTERS.start only gives the handshake a head start: one login attempt, not two, and a
    refused connection is the session's one error line, as without it."""
    launched = []
    launch = remote._Masters._launch

    def counted(self, target, socket):
        launched.append(target)
        return launch(self, target, socket)
    monkeypatch.setattr(remote._Masters, "_launch", counted)
    masters = remote._Masters()
    monkeypatch.setattr(remote, "MASTERS", masters)
    target = Target(host="127.0.0.1", port=closed_port(), user="deploy")
    remote.begin_connecting([target], 4)
    with pytest.raises(ToolkitError, match=r"connection refused; is the server up"):
        remote.open_session(target)
    assert launched == [target]
    masters.close_all()


def test_a_handshake_started_early_and_never_used_is_ended_at_exit(monkeypatch):
    """A run that fails before its first session (a bad package) leaves no ssh behind, even
    one still waiting for a server that never answers."""
    with socket.socket() as silent:  # accepts, then never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = Target(host="127.0.0.1", port=silent.getsockname()[1], user="deploy")
        monkeypatch.setattr(remote, "HANDSHAKE_AT_EXIT_S", 0.3)
        masters = remote._Masters()
        masters.start(target)
        (process,) = masters._starting.values()
        started = time.monotonic()
        masters.close_all()
        assert process.poll() is not None and time.monotonic() - started < 5
