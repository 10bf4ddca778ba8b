"""Notification texts and delivery rules, against a local HTTP endpoint (no real chat)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from scripts.notify import Event, Notifier, message
from scripts.settings import load_settings

TOKEN = "123456:SECRET-token_value"


class Recorder(BaseHTTPRequestHandler):
    received: list = []
    status = 200
    delay = 0.0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.received.append((self.path, body))
        time.sleep(Recorder.delay)
        self.send_response(Recorder.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    Recorder.received, Recorder.status, Recorder.delay = [], 200, 0.0
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def settings_for(url: str, **extra):
    environ = {"NOTIFY_WEBHOOK_URL": f"{url}/hooks/abc", "TELEGRAM_BOT_TOKEN": TOKEN,
               "TELEGRAM_CHAT_ID": "-100123", "TELEGRAM_API_URL": url, "NOTIFY_TIMEOUT_S": "1",
               **extra}
    return load_settings(Path("/nonexistent"), environ=environ)


FAILED = Event("deploy", "failed", ["web-1", "web-2"], "abc123def456", "olga@laptop",
               commit="9f8e7d6c5b4a", seconds=4.2, step="migrate", error="no such table")


def test_the_message_says_hosts_release_commit_who_duration_and_the_failing_step():
    text = message(FAILED, "ru")
    for part in ("Развёртывание ОШИБКА", "abc123def456", "web-1, web-2", "olga@laptop",
                 "9f8e7d6c5b4a", "4.2 с", "шаг: migrate", "ошибка: no such table"):
        assert part in text
    assert "Deploy FAILED" in message(FAILED, "en")


def test_webhook_and_telegram_receive_the_same_text(endpoint):
    logs = []
    Notifier(settings_for(endpoint), log=logs.append).send(FAILED)
    paths = [path for path, _ in Recorder.received]
    assert paths == ["/hooks/abc", f"/bot{TOKEN}/sendMessage"]
    webhook, telegram = (body for _, body in Recorder.received)
    assert webhook == {"text": message(FAILED, "ru")}
    assert telegram["chat_id"] == "-100123" and telegram["text"] == webhook["text"]
    assert logs == []


def test_an_endpoint_answering_500_warns_once_per_channel_without_the_token(endpoint):
    Recorder.status = 500
    logs = []
    Notifier(settings_for(endpoint), log=logs.append).send(FAILED)
    assert len(logs) == 2 and all("HTTP 500" in line for line in logs)
    assert not any(TOKEN in line or "abc" in line.split("not delivered")[0] for line in logs)


def test_a_hanging_endpoint_costs_at_most_the_timeout(endpoint):
    Recorder.delay = 3
    logs = []
    started = time.monotonic()
    Notifier(settings_for(endpoint, TELEGRAM_BOT_TOKEN=""), log=logs.append).send(FAILED)
    assert time.monotonic() - started < 2.5
    assert len(logs) == 1 and "ReadTimeout" in logs[0]


def test_nothing_is_sent_without_configuration_or_in_a_dry_run(endpoint):
    Notifier(load_settings(Path("/nonexistent"), environ={})).send(FAILED)
    Notifier(settings_for(endpoint, DRY_RUN="1")).send(FAILED)
    assert Recorder.received == []


def test_a_bad_token_is_refused_without_being_shown():
    from scripts.errors import SettingsError
    with pytest.raises(SettingsError) as caught:
        load_settings(Path("/nonexistent"), environ={"TELEGRAM_BOT_TOKEN": "not a token"})
    assert "not a token" not in str(caught.value) and "TELEGRAM_BOT_TOKEN=***" in str(caught.value)
