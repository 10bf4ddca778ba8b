"""HTTPS as a server serves it: the certificate nginx presents on port 443 for SERVER_NAME and
what answers there, read on the server itself over loopback (so it works wherever the
deploying machine stands, the sandbox's forwarded ports included). verify, status and check
use it; the certificate's chain is trusted or not from outside (PUBLIC_URL)."""

from __future__ import annotations

from datetime import datetime, timezone

from scripts.settings import Settings

# `check` warns when the certificate expires sooner: certbot.timer renews at 30 days left, so
# under 14 its renewals have failed for two weeks.
EXPIRY_WARNING_DAYS = 14


def primary_name(settings: Settings) -> str:
    """The certificate's first name: SERVER_NAME's first word."""
    return settings.server_name.split()[0]


def certificate_argv(name: str) -> list[str]:
    """The end date of the certificate nginx presents for `name` on 127.0.0.1:443."""
    return ["sh", "-c", 'echo | openssl s_client -connect 127.0.0.1:443 -servername "$1" '
            '2>/dev/null | openssl x509 -noout -enddate', "https-certificate", name]


def health_argv(name: str, health_path: str) -> list[str]:
    """The health answer through nginx on port 443 for `name`. -k: this reads our own nginx
    over loopback; whether browsers trust the chain is checked from outside."""
    return ["curl", "-fsS", "-k", "--max-time", "10", "--resolve", f"{name}:443:127.0.0.1",
            f"https://{name}{health_path}"]


def days_left(enddate_output: str, now: datetime | None = None) -> int | None:
    """Whole days from now to openssl's `notAfter=Feb 27 10:00:00 2027 GMT`; None if absent."""
    text = enddate_output.strip().removeprefix("notAfter=")
    try:
        end = datetime.strptime(text, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return (end - (now or datetime.now(timezone.utc))).days


def expiry_text(settings: Settings, days: int | None) -> str:
    name = primary_name(settings)
    if days is None:
        return (f"HTTPS: nginx presents no certificate for {name} on port 443; run `doit setup` "
                f"(HTTPS=1 obtains one)")
    if days < 0:
        return f"HTTPS: the certificate for {name} expired {-days} days ago"
    return f"HTTPS: the certificate for {name} expires in {days} days"


def certificate_days(server, settings: Settings) -> int | None:
    output = server.run(certificate_argv(primary_name(settings)), check=False, reads=True)
    return days_left(output.stdout) if output.status == 0 else None


def check_results(server, settings: Settings) -> list[tuple[bool, str]]:
    """pre_deploy_checks: an expiring or missing certificate is a warning, not a stop (the
    deploy itself does not need it)."""
    if not settings.https:
        return []
    days = certificate_days(server, settings)
    text = expiry_text(settings, days)
    if days is None or days < EXPIRY_WARNING_DAYS:
        return [(True, f"warning: {text}; certbot.timer renews it: see `sudo journalctl -u "
                       f"certbot` on the server")]
    return [(True, text)]
