"""Deploy notifications: a generic JSON webhook (Slack/Mattermost `text` payload) and
Telegram's Bot API. A notification that cannot be delivered warns in one line and never fails
a deploy; each attempt is bounded by NOTIFY_TIMEOUT_S. Tokens never appear in any output."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

from scripts.settings import Settings

WORDS = {
    "ru": {"start": "начато", "ok": "успешно", "failed": "ОШИБКА", "deploy": "Развёртывание",
           "rollback": "Откат", "release": "релиз", "commit": "коммит", "who": "кто",
           "hosts": "серверы", "duration": "длительность", "step": "шаг", "error": "ошибка",
           "seconds": "с"},
    "en": {"start": "started", "ok": "succeeded", "failed": "FAILED", "deploy": "Deploy",
           "rollback": "Rollback", "release": "release", "commit": "commit", "who": "who",
           "hosts": "servers", "duration": "duration", "step": "step", "error": "error",
           "seconds": "s"},
}


@dataclass
class Event:
    action: str            # deploy | rollback
    result: str            # start | ok | failed
    hosts: list[str]
    release: str
    who: str
    commit: str = ""
    seconds: float | None = None
    step: str = ""
    error: str = ""
    extra: dict = field(default_factory=dict)


def message(event: Event, language: str = "ru") -> str:
    words = WORDS.get(language, WORDS["en"])
    icon = {"start": "⏳", "ok": "✅", "failed": "❌"}[event.result]
    lines = [f"{icon} {words[event.action]} {words[event.result]}: "
             f"{words['release']} {event.release}",
             f"{words['hosts']}: {', '.join(event.hosts)}",
             f"{words['who']}: {event.who}"]
    if event.commit:
        lines.append(f"{words['commit']}: {event.commit}")
    if event.seconds is not None:
        lines.append(f"{words['duration']}: {event.seconds:.1f} {words['seconds']}")
    if event.result == "failed":
        lines.append(f"{words['step']}: {event.step or '?'}; {words['error']}: {event.error}")
    return "\n".join(lines)


def _where(url: str) -> str:
    """A URL as it may be shown: scheme and host only (paths and queries carry tokens)."""
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.hostname}"


class Notifier:
    def __init__(self, settings: Settings, log=print):
        self.settings = settings
        self.log = log

    @property
    def enabled(self) -> bool:
        s = self.settings
        if s.dry_run:  # a dry run changes nothing, so there is nothing to tell
            return False
        return bool(s.notify_webhook_url or (s.telegram_bot_token and s.telegram_chat_id))

    def send(self, event: Event) -> None:
        if not self.enabled:
            return
        text = message(event, self.settings.notify_language)
        s = self.settings
        if s.notify_webhook_url:
            self._post("webhook", s.notify_webhook_url, {"text": text})
        if s.telegram_bot_token and s.telegram_chat_id:
            url = f"{s.telegram_api_url.rstrip('/')}/bot{s.telegram_bot_token}/sendMessage"
            self._post("Telegram", url, {"chat_id": s.telegram_chat_id, "text": text,
                                         "disable_web_page_preview": True},
                       shown=_where(s.telegram_api_url))

    def _post(self, channel: str, url: str, payload: dict, shown: str = "") -> None:
        import requests  # here: ~0.1 s of start-up that every deploy and rollback would pay

        shown = shown or _where(url)
        try:
            response = requests.post(url, json=payload, timeout=self.settings.notify_timeout_s)
        except requests.RequestException as error:
            self.log(f"warning: {channel} notification to {shown} not delivered "
                     f"({type(error).__name__}); the deploy goes on")
            return
        if not response.ok:
            self.log(f"warning: {channel} notification to {shown} not delivered (HTTP "
                     f"{response.status_code}); the deploy goes on")
