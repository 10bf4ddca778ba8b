"""What `doit ship` (and deploy) says per server once the fleet is done."""

from __future__ import annotations

import contextlib
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
    monkeypatch.setattr("scripts.deploy.verify.verify_server", lambda *a: [])
    monkeypatch.setattr(actions, "_print_results", lambda reporter, results: True)
    assert actions.verify_action() is True
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err == ""
    assert "verify: release cccc serves on 1 server(s); open http://127.0.0.1:8080/" in out
    assert "release current" not in out
