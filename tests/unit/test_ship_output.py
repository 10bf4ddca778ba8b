"""What `doit ship` (and deploy) says per server once the fleet is done."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from scripts.actions import deploy as actions
from scripts.deploy.deploy import DeployOutcome
from scripts.deploy.report import Reporter
from scripts.settings import load_settings


@pytest.mark.parametrize("outcome, said", [
    (DeployOutcome("web", "bbbb", "aaaa", True, 3.2),
     "deploy: release bbbb deployed in 3.2 s (previous: aaaa)"),
    (DeployOutcome("web", "bbbb", None, True, 9.0),
     "deploy: release bbbb deployed in 9.0 s (previous: none)"),
    # Already current: no "(previous: bbbb)" repeating the release itself.
    (DeployOutcome("web", "bbbb", "bbbb", False, 0.2),
     "deploy: release bbbb already current in 0.2 s"),
])
def test_the_per_server_line_names_a_previous_release_only_when_there_is_one(
        monkeypatch, tmp_path, capsys, outcome, said):
    settings = load_settings(tmp_path / "none.env", environ={})
    lines = []
    record = SimpleNamespace(release_id="bbbb", git_commit="")
    monkeypatch.setattr(actions, "load_settings", lambda: settings)
    monkeypatch.setattr(actions, "built_package", lambda s: (record, tmp_path / "p.tar.gz"))
    monkeypatch.setattr("scripts.notify.Notifier", lambda s: SimpleNamespace(send=lambda e: None))
    monkeypatch.setattr(actions, "_servers",
                        lambda s: [(None, Reporter(server="web", log=lines.append))])
    monkeypatch.setattr("scripts.deploy.fleet.connected", lambda servers, n: contextlib.nullcontext())
    monkeypatch.setattr("scripts.deploy.fleet.deploy_fleet", lambda *a, **k: [outcome])
    actions.ship_action()
    assert lines == [said]


class _Serving:
    name = "web"
    deploy_path = "/var/www/app"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def ensure_tool(self):
        return True

    def tool_call(self, *args):
        return {"current": "cccc"}


def test_a_dry_run_verify_names_the_release_that_serves(monkeypatch, tmp_path, capsys):
    settings = load_settings(tmp_path / "none.env", environ={"DRY_RUN": "1"})
    monkeypatch.setattr(actions, "load_settings", lambda: settings)
    monkeypatch.setattr("scripts.build.package.record_path", lambda s: tmp_path / "dist" / "app.json")
    monkeypatch.setattr("scripts.targets.deploy_targets", lambda s: ["web"])
    monkeypatch.setattr(actions, "public_urls", lambda s, t: {"web": "http://127.0.0.1:8080/"})
    monkeypatch.setattr(actions, "_servers",
                        lambda s: [(_Serving(), Reporter(server="web", log=print))])
    monkeypatch.setattr("scripts.deploy.verify.verify_server", lambda *a, **kw: [])
    monkeypatch.setattr(actions, "_print_results", lambda reporter, results: True)
    assert actions.verify_action() is True
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err == ""
    assert "verify: release cccc serves on 1 server(s); open http://127.0.0.1:8080/" in out
    assert "release current" not in out


class SlowStream:
    """A terminal that takes its time per write: another thread runs in between."""

    def __init__(self):
        self.written = []

    def write(self, text):
        time.sleep(0.001)
        self.written.append(text)

    def flush(self):
        pass


def test_servers_reporting_side_by_side_never_share_a_line(monkeypatch):
    """A fleet's servers print from threads; print() writes a line and its newline apart."""
    stream = SlowStream()
    monkeypatch.setattr(sys, "stdout", stream)
    reporters = [Reporter(server=f"server-{n}", show_server=True) for n in range(4)]
    threads = [threading.Thread(target=lambda r=r: [r.line(f"ok       step{i}")
                                                    for i in range(20)]) for r in reporters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = "".join(stream.written).splitlines()
    assert len(lines) == 80
    assert all(line.count("server-") == 1 and line.startswith("server-") for line in lines)
