"""Which of the guide's commands verify sends to the server: all of them for `doit verify`;
in `doit deploy`, `sudo nginx -t` only where that deploy's check did not pass it. Real servers:
tests/integration/test_deploy.py."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest

from scripts.deploy import commands, verify
from scripts.deploy.server import Result
from scripts.remote import Target
from scripts.settings import load_settings


class VerifyingServer:
    """Answers the server tool's `verify` call as a healthy server would, and keeps the spec."""
    name = "fake"
    deploy_path = PurePosixPath("/var/www/flask_helpdesk")
    target = Target("fake", 22, "deploy")

    def __init__(self):
        self.specs: list[dict] = []

    def tool_call(self, subcommand, spec_json, what="", reads=None):
        assert subcommand == "verify"
        spec = json.loads(spec_json)
        self.specs.append(spec)
        return {"answers": [["active", "active"],
                            *(["healthy", spec["expected"]] for _ in spec["health"]),
                            *(["ran", 0, ""] for _ in spec["commands"])]}

    def run(self, argv, check=True, what="", reads=False):
        return Result(1, "", "no such file")  # maintenance mode is off


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("ENV_FILE", str(tmp_path / "none.env"))
    monkeypatch.setenv("APP_DIR", str(tmp_path))
    monkeypatch.setattr(verify, "_from_outside",
                        lambda url, path, expected: (True, f"{url} from here answers"))
    return load_settings()


def guide_lines(results) -> list[str]:
    return [text for ok, text in results if text.startswith("guide: ") and ok]


def test_verify_alone_runs_every_guide_command(settings):
    server = VerifyingServer()
    results = verify.verify_server(server, settings, "r1", "http://example.test/")
    sent = [label for label, _, _ in server.specs[0]["commands"]]
    assert "sudo nginx -t" in sent and len(sent) == 13
    assert guide_lines(results) == [f"guide: {label}" for label in sent]
    assert all(ok for ok, _ in results)


def test_a_deploys_verify_does_not_run_the_nginx_test_its_check_passed(settings):
    server = VerifyingServer()
    results = verify.verify_server(server, settings, "r1", "http://example.test/",
                                   nginx_checked=True)
    sent = [label for label, _, _ in server.specs[0]["commands"]]
    assert "sudo nginx -t" not in sent and len(sent) == 12
    alone = verify.verify_server(VerifyingServer(), settings, "r1", "http://example.test/")
    # Every guide line still there, in the guide's order; the skipped one says why.
    said = guide_lines(results)
    assert len(said) == len(guide_lines(alone)) == 13
    position = [label for label, _ in commands.guide_checks(settings)].index("sudo nginx -t")
    assert said[position] == (
        "guide: sudo nginx -t: passed in this deploy's check (ship changes no nginx file)")
    assert [line for line in said if "nginx -t" not in line] == \
        [line for line in guide_lines(alone) if "nginx -t" not in line]
