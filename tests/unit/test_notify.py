"""Notification texts and delivery rules, against a local HTTP endpoint (no real chat)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scripts.notify import Event, Notifier, message
from scripts.settings import load_settings
from tests.inbox import Inbox

TOKEN = "123456:SECRET-token_value"


@pytest.fixture()
def inbox():
    endpoint = Inbox()
    yield endpoint
    endpoint.close()


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


def test_webhook_and_telegram_receive_the_same_text(inbox):
    logs = []
    Notifier(settings_for(inbox.url), log=logs.append).send(FAILED)
    paths = [path for path, _ in inbox.messages]
    assert paths == ["/hooks/abc", f"/bot{TOKEN}/sendMessage"]
    webhook, telegram = (body for _, body in inbox.messages)
    assert webhook == {"text": message(FAILED, "ru")}
    assert telegram["chat_id"] == "-100123" and telegram["text"] == webhook["text"]
    assert logs == []


def test_an_endpoint_answering_500_warns_once_per_channel_without_the_token(inbox):
    inbox.status = 500
    logs = []
    Notifier(settings_for(inbox.url), log=logs.append).send(FAILED)
    assert len(logs) == 2 and all("HTTP 500" in line for line in logs)
    assert not any(TOKEN in line or "abc" in line.split("not delivered")[0] for line in logs)


def test_a_hanging_endpoint_costs_at_most_the_timeout(inbox):
    inbox.delay = 3
    logs = []
    started = time.monotonic()
    Notifier(settings_for(inbox.url, TELEGRAM_BOT_TOKEN=""), log=logs.append).send(FAILED)
    assert time.monotonic() - started < 2.5
    assert len(logs) == 1 and "ReadTimeout" in logs[0]


def test_nothing_is_sent_without_configuration_or_in_a_dry_run(inbox):
    Notifier(load_settings(Path("/nonexistent"), environ={})).send(FAILED)
    Notifier(settings_for(inbox.url, DRY_RUN="1")).send(FAILED)
    assert inbox.messages == []


def test_a_bad_token_is_refused_without_being_shown():
    from scripts.errors import SettingsError
    with pytest.raises(SettingsError) as caught:
        load_settings(Path("/nonexistent"), environ={"TELEGRAM_BOT_TOKEN": "not a token"})
    assert "not a token" not in str(caught.value) and "TELEGRAM_BOT_TOKEN=***" in str(caught.value)
