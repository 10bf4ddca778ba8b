"""Notifications of real deploys reach a webhook and a Telegram-like API on loopback, never
slow or fail a deploy, never print the token; `doit history` reads the servers' deploy logs."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytestmark = pytest.mark.integration

TOKEN = "987654:NEVER-print-this-token"


class Inbox(BaseHTTPRequestHandler):
    messages: list = []
    status = 200
    delay = 0.0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(Inbox.delay)
        Inbox.messages.append((self.path, body))
        self.send_response(Inbox.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def inbox():
    server = HTTPServer(("127.0.0.1", 0), Inbox)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture()
def notify(inbox):
    Inbox.messages, Inbox.status, Inbox.delay = [], 200, 0.0
    return {"NOTIFY_WEBHOOK_URL": f"{inbox}/hooks/team", "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_CHAT_ID": "-1001", "TELEGRAM_API_URL": inbox, "NOTIFY_TIMEOUT_S": "1"}


def texts(channel_path: str) -> list[str]:
    return [body["text"] for path, body in Inbox.messages if path == channel_path]


def test_a_successful_deploy_announces_start_and_success(site, notify):
    site.change_code("notified")
    result = site.deploy(**notify)
    assert result.returncode == 0, result.stdout + result.stderr
    release = site.built_release()
    webhook = texts("/hooks/team")
    assert len(webhook) == 2
    assert "Развёртывание начато" in webhook[0] and "Развёртывание успешно" in webhook[1]
    assert all(release in text and site.server.name in text for text in webhook)
    assert texts(f"/bot{TOKEN}/sendMessage") == webhook
    assert TOKEN not in result.stdout + result.stderr


def test_a_failed_deploy_says_which_step_and_why(site, notify):
    wsgi = site.app_dir / "wsgi.py"
    good = wsgi.read_text()
    wsgi.write_text("raise ImportError('broken')\n" + good)
    try:
        result = site.deploy(**notify)
    finally:
        wsgi.write_text(good)
    assert result.returncode != 0
    failure = texts("/hooks/team")[-1]
    assert "Развёртывание ОШИБКА" in failure and "шаг: migrate" in failure


def test_a_rollback_is_announced(site, notify):
    site.change_code("second notified")
    assert site.deploy().returncode == 0
    result = site.doit("rollback", NOTIFY_LANGUAGE="en", **notify)
    assert result.returncode == 0, result.stderr
    assert "Rollback succeeded" in texts("/hooks/team")[-1]


@pytest.mark.parametrize("trouble", ["500", "hang"])
def test_an_unreachable_endpoint_never_fails_or_stalls_a_deploy(site, notify, trouble):
    if trouble == "500":
        Inbox.status = 500
    else:
        Inbox.delay = 5
    site.change_code(f"endpoint {trouble}")
    assert site.doit("-s", "build").returncode == 0
    started = time.monotonic()
    result = site.doit("-s", "ship", **notify)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if "not delivered" in line]
    assert warnings and all(TOKEN not in line for line in warnings)
    assert elapsed < 30
    assert site.served_release() == site.built_release()


def test_history_lists_the_deploys_newest_first(site):
    result = site.doit("history")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("when (UTC)"))
    rows = lines[header + 1:]
    times = [row.split()[0] for row in rows]
    assert times == sorted(times, reverse=True)
    assert any(" rollback " in row and " ok" in row for row in rows)
    assert any(" deploy " in row and "failed at migrate" in row for row in rows)
    assert site.served_release() in rows[0] and " ok" in rows[0]
