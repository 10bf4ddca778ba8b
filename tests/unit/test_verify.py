"""verify from the deploying machine: URLs for every kind of address, and health answers that are
plain text or JSON (a `release` in JSON is checked)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from scripts.deploy import verify
from scripts.actions.deploy import public_urls
from scripts.deploy.commands import host_url
from scripts.remote import Target
from scripts.settings import load_settings


@pytest.mark.parametrize("host, url", [
    ("web-1.example.com", "http://web-1.example.com/"),
    ("192.0.2.10", "http://192.0.2.10/"),
    ("2001:db8::1", "http://[2001:db8::1]/"),
    ("[2001:db8::1]", "http://[2001:db8::1]/"),
    ("::1", "http://[::1]/"),
])
def test_host_url_brackets_ipv6_literals(host, url):
    assert host_url(host) == url


def test_public_urls_of_ipv6_servers_with_ports():
    settings = load_settings(env_file=None, environ={
        "ENV_FILE": "/nonexistent", "DEPLOY_SERVER": "deploy@[2001:db8::1]:2222,web-2.example.com"})
    targets = [Target("2001:db8::1", 2222, "deploy", None, None),
               Target("web-2.example.com", 22, "deploy", None, None)]
    assert list(public_urls(settings, targets).values()) == ["http://[2001:db8::1]/",
                                                            "http://web-2.example.com/"]


@pytest.mark.parametrize("body, release", [
    ('{"status": "ok", "release": "r1"}', "r1"), ("OK", None), ("", None), ("[1]", None),
    ('{"status": "ok"}', None)])
def test_reported_release_is_a_bonus_of_json_answers(body, release):
    assert verify.reported_release(body) == release


class Answer(BaseHTTPRequestHandler):
    status, body = 200, b"OK"

    def do_GET(self):
        self.send_response(Answer.status)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(Answer.body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def answering(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def answer(status: int, body: bytes) -> str:
        monkeypatch.setattr(Answer, "status", status)
        monkeypatch.setattr(Answer, "body", body)
        return f"http://127.0.0.1:{server.server_port}/"
    yield answer
    server.shutdown()


def test_a_plain_text_health_page_passes_from_outside(answering):
    ok, text = verify._from_outside(answering(200, b"pong"), "/ping", "r1")
    assert ok and text.endswith("answers 2xx (it reports no release)")


def test_a_json_health_page_must_name_the_expected_release(answering):
    assert verify._from_outside(answering(200, b'{"release": "r1"}'), "/healthz", "r1")[0]
    ok, text = verify._from_outside(answering(200, b'{"release": "r0"}'), "/healthz", "r1")
    assert not ok and "answers release r0, not r1" in text


def test_an_error_status_fails(answering):
    ok, text = verify._from_outside(answering(503, b"down"), "/ping", "r1")
    assert not ok and text.endswith("HTTP 503")
