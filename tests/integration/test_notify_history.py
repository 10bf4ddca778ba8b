"""Notifications of real deploys reach a webhook and a Telegram-like API on loopback, never
slow or fail a deploy, never print the token; `doit history` reads the servers' deploy logs."""

from __future__ import annotations

import time

import pytest

from tests.inbox import Inbox

pytestmark = pytest.mark.integration

TOKEN = "987654:NEVER-print-this-token"


@pytest.fixture(scope="module")
def inbox():
    endpoint = Inbox()
    yield endpoint
    endpoint.close()


@pytest.fixture()
def notify(inbox):
    inbox.reset()
    return {"NOTIFY_WEBHOOK_URL": f"{inbox.url}/hooks/team", "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_CHAT_ID": "-1001", "TELEGRAM_API_URL": inbox.url, "NOTIFY_TIMEOUT_S": "1"}


def test_a_successful_deploy_announces_start_and_success(site, notify, inbox):
    site.change_code("notified")
    result = site.deploy(**notify)
    assert result.returncode == 0, result.stdout + result.stderr
    release = site.built_release()
    webhook = inbox.texts("/hooks/team")
    assert len(webhook) == 2
    assert "Развёртывание начато" in webhook[0] and "Развёртывание успешно" in webhook[1]
    assert all(release in text and site.server.name in text for text in webhook)
    assert inbox.texts(f"/bot{TOKEN}/sendMessage") == webhook
    assert TOKEN not in result.stdout + result.stderr


def test_a_failed_deploy_says_which_step_and_why(site, notify, inbox):
    # The migrations run (MIGRATIONS_PATHS empty: always), and they import the app first.
    with site.edited("wsgi.py", lambda good: "raise ImportError('broken')\n" + good):
        result = site.deploy(**notify, MIGRATIONS_PATHS="")
    assert result.returncode != 0
    failure = inbox.texts("/hooks/team")[-1]
    assert "Развёртывание ОШИБКА" in failure and "шаг: migrate" in failure


def test_a_rollback_is_announced(site, notify, inbox):
    site.change_code("second notified")
    assert site.deploy().returncode == 0
    result = site.doit("rollback", NOTIFY_LANGUAGE="en", **notify)
    assert result.returncode == 0, result.stderr
    assert "Rollback succeeded" in inbox.texts("/hooks/team")[-1]


@pytest.mark.parametrize("trouble", ["500", "hang"])
def test_an_unreachable_endpoint_never_fails_or_stalls_a_deploy(site, notify, inbox, trouble):
    if trouble == "500":
        inbox.status = 500
    else:
        inbox.delay = 5
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
