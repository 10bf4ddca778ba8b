"""HTTPS settings, server_setup.sh's flags for them, and reading a certificate's expiry."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from scripts.deploy import https
from scripts.errors import SettingsError
from scripts.provision import https_flags
from scripts.settings import LETS_ENCRYPT, load_settings


def settings(**environ: str):
    return load_settings(Path("/nonexistent"), environ=environ)


def test_https_is_off_by_default_and_lets_encrypt_is_the_acme_server():
    plain = settings()
    assert not plain.https and not plain.hsts
    assert plain.acme_server == LETS_ENCRYPT
    assert https_flags(plain) == ["--acme-server", LETS_ENCRYPT]


@pytest.mark.parametrize("environ, line", [
    ({"HTTPS": "1", "LETSENCRYPT_EMAIL": "a@example.com"}, "HTTPS=1 needs SERVER_NAME"),
    ({"HTTPS": "1", "SERVER_NAME": "*.example.com", "LETSENCRYPT_EMAIL": "a@example.com"},
     "HTTPS=1 needs SERVER_NAME"),
    ({"HTTPS": "1", "SERVER_NAME": "h.example.com"}, "HTTPS=1 needs LETSENCRYPT_EMAIL"),
    ({"LETSENCRYPT_EMAIL": "nobody"}, "LETSENCRYPT_EMAIL='nobody' must be an email address"),
    ({"ACME_SERVER": "http://acme.example.com/dir"}, "must be the https:// URL"),
    ({"ACME_CA_BUNDLE": "/etc/hostname"}, "ACME_CA_BUNDLE is only for a custom ACME_SERVER"),
])
def test_bad_https_settings_are_one_line_each(environ, line):
    with pytest.raises(SettingsError) as error:
        settings(**environ)
    assert line in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_https_flags_carry_every_https_setting(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    on = settings(HTTPS="1", SERVER_NAME="h.example.com", LETSENCRYPT_EMAIL="a@example.com",
                  ACME_SERVER="https://127.0.0.1:14000/dir", ACME_CA_BUNDLE=str(ca), HSTS="1")
    assert https_flags(on) == ["--acme-server", "https://127.0.0.1:14000/dir", "--https",
                               "--letsencrypt-email", "a@example.com",
                               "--acme-ca-bundle", str(ca), "--hsts"]


def test_days_left_reads_openssls_end_date():
    now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    assert https.days_left("notAfter=Dec 29 12:00:00 2026 GMT\n", now) == 30
    assert https.days_left("notAfter=Dec  9 13:00:00 2026 GMT", now) == 10
    assert https.days_left("notAfter=Nov 28 12:00:00 2026 GMT", now) == -1
    assert https.days_left("", now) is None


class FakeServer:
    def __init__(self, stdout: str, status: int = 0):
        self.stdout, self.status = stdout, status
        self.argvs = []

    def run(self, argv, check=True, reads=False):
        from scripts.deploy.server import Result
        self.argvs.append(argv)
        return Result(self.status, self.stdout, "")


def test_check_warns_under_14_days_and_is_silent_when_https_is_off():
    on = settings(HTTPS="1", SERVER_NAME="h.example.com www.h.example.com",
                  LETSENCRYPT_EMAIL="a@example.com")
    soon = datetime.now(timezone.utc).replace(microsecond=0)
    end = (soon.replace(year=soon.year + 1)).strftime("notAfter=%b %d %H:%M:%S %Y GMT")
    server = FakeServer(end)
    ((ok, text),) = https.check_results(server, on)
    assert ok and not text.startswith("warning:") and "expires in 36" in text
    assert "-servername \"$1\"" in server.argvs[0][2] and server.argvs[0][-1] == "h.example.com"
    from datetime import timedelta
    near = (soon + timedelta(days=5, hours=1)).strftime("notAfter=%b %d %H:%M:%S %Y GMT")
    ((ok, text),) = https.check_results(FakeServer(near), on)
    assert ok and text.startswith("warning: HTTPS: the certificate for h.example.com expires "
                                  "in 5 days")
    ((ok, text),) = https.check_results(FakeServer("", status=1), on)
    assert text.startswith("warning: HTTPS: nginx presents no certificate")
    assert https.check_results(FakeServer(end), settings()) == []


def test_with_https_verify_opens_the_certificates_name_unless_public_url_says_otherwise():
    from scripts.actions.deploy import public_urls
    from scripts.remote import Target

    targets = [Target("203.0.113.7", 22, "deploy", None, None)]
    on = settings(DEPLOY_SERVER="203.0.113.7", HTTPS="1", SERVER_NAME="h.example.com www.x.org",
                  LETSENCRYPT_EMAIL="a@example.com")
    assert list(public_urls(on, targets).values()) == ["https://h.example.com/"]
    chosen = settings(DEPLOY_SERVER="203.0.113.7", HTTPS="1", SERVER_NAME="h.example.com",
                      LETSENCRYPT_EMAIL="a@example.com", PUBLIC_URL="https://app.example.com/")
    assert list(public_urls(chosen, targets).values()) == ["https://app.example.com/"]
    plain = settings(DEPLOY_SERVER="203.0.113.7")
    assert list(public_urls(plain, targets).values()) == ["http://203.0.113.7/"]
