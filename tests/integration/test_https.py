"""HTTPS=1 against a real ACME server: pebble on this machine's loopback validates HTTP-01 at
the sandbox server's nginx (the challenge really travels there), certbot gets a certificate,
nginx serves 443 and redirects HTTP, a forced renewal drops no request, and bad input gets one
clear line while the site keeps serving HTTP. The tests run in order on one server."""

from __future__ import annotations

import re
import socket
import ssl
import time

import pytest
import requests

from scripts.loadgen import Load
from tests.integration.acme import Pebble

NAME = "helpdesk.test"
EMAIL = "admin@example.com"


@pytest.fixture(scope="module")
def pebble(site, tmp_path_factory):
    acme = Pebble(tmp_path_factory.mktemp("pebble"), site.server)
    try:
        yield acme.start()
    finally:
        acme.stop()


@pytest.fixture(scope="module")
def deployed(site):
    result = site.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def https_settings(pebble: Pebble, **more: str) -> dict:
    return {"HTTPS": "1", "SERVER_NAME": NAME, "LETSENCRYPT_EMAIL": EMAIL,
            "ACME_SERVER": pebble.acme_server, "ACME_CA_BUNDLE": str(pebble.listener_ca),
            **more}


def error_lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("error:")]


def serves_http(site) -> bool:
    return requests.get(site.url + "healthz", timeout=10).ok


def served(pebble: Pebble, highest: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
           ) -> tuple[str, str]:
    """The serial number of the certificate nginx presents for NAME on port 443, and the TLS
    version agreed when this client offers up to `highest`."""
    context = ssl.create_default_context(cafile=str(pebble.issuing_root))
    context.maximum_version = highest
    with socket.create_connection(("127.0.0.1", pebble.https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            return tls.getpeercert()["serialNumber"], tls.version()


def served_serial(pebble: Pebble) -> str:
    return served(pebble)[0]


def test_https_without_a_domain_or_an_email_is_one_line_and_touches_no_server(deployed):
    for settings, wanted in (({"HTTPS": "1", "LETSENCRYPT_EMAIL": EMAIL}, "SERVER_NAME"),
                             ({"HTTPS": "1", "SERVER_NAME": NAME}, "LETSENCRYPT_EMAIL")):
        result = deployed.doit("setup", **settings)
        assert result.returncode != 0
        (line,) = error_lines(result)
        assert f"HTTPS=1 needs {wanted}" in line
        assert "setup:" not in result.stdout  # no server was contacted


def test_an_unreachable_acme_server_is_one_line_and_the_site_keeps_serving_http(deployed,
                                                                                 pebble):
    result = deployed.doit("setup", **https_settings(
        pebble, ACME_SERVER="https://127.0.0.1:14999/dir"))
    assert result.returncode != 0
    line = error_lines(result)[-1]
    assert "the ACME server https://127.0.0.1:14999/dir cannot be reached" in line, line
    assert "keeps serving HTTP" in line
    assert serves_http(deployed)


def test_a_name_that_does_not_point_at_the_server_gets_the_acme_error_in_one_line(deployed,
                                                                                   pebble):
    pebble.point("wrong.test", "127.0.0.2")  # nothing of the server's listens there
    result = deployed.doit("setup", **https_settings(pebble, SERVER_NAME="wrong.test"))
    assert result.returncode != 0
    line = error_lines(result)[-1]
    assert line.startswith("error: setup on") and "no certificate for wrong.test" in line, line
    assert "127.0.0.2" in line  # pebble's own words: where it tried to fetch the challenge
    assert "\n" not in line
    assert serves_http(deployed)


def test_setup_gets_a_certificate_by_real_http01_and_serves_https(deployed, pebble):
    result = deployed.doit("setup", **https_settings(pebble))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"changed: certificate for {NAME} from {pebble.acme_server}" in result.stdout
    # The challenge was fetched from nginx (not pebble's always-valid mode).
    with deployed.admin() as admin:
        access = admin["sudo"]["-n", "cat", "/var/log/nginx/flask_helpdesk_access.log"]()
        hook = admin["sudo"]["-n", "stat", "-c", "%U %a",
                             "/etc/letsencrypt/renewal-hooks/deploy/flask_helpdesk-nginx-reload"]()
        webroot = admin["stat"]["-c", "%U %a", "/var/www/acme-challenge"]()
        timer = admin["systemctl"]["is-enabled", "certbot.timer"]()
    assert re.search(r'"GET /\.well-known/acme-challenge/\S+ HTTP/1\.1" 200 ', access), access
    assert hook.split() == ["root", "755"] and webroot.split() == ["root", "755"]
    assert timer.strip() == "enabled"
    # curl over HTTPS through the forwarded port, trusting pebble's root only.
    answer = pebble.curl(NAME, "/healthz", "-f")
    assert answer.returncode == 0, answer.stderr
    assert '"release"' in answer.stdout
    assert served(pebble)[1] == "TLSv1.3"
    assert served(pebble, ssl.TLSVersion.TLSv1_2)[1] == "TLSv1.2"


def test_http_redirects_to_https_except_the_acme_challenge(deployed, pebble):
    plain = requests.get(deployed.url + "healthz?x=1", headers={"Host": NAME},
                         allow_redirects=False, timeout=10)
    assert plain.status_code == 301
    assert plain.headers["Location"] == f"https://{NAME}/healthz?x=1"
    challenge = requests.get(deployed.url + ".well-known/acme-challenge/none",
                             headers={"Host": NAME}, allow_redirects=False, timeout=10)
    assert challenge.status_code == 404
    # Loopback names stay on HTTP: the guide's `curl http://localhost/`, the server's checks.
    assert requests.get(deployed.url + "healthz", allow_redirects=False, timeout=10).ok


def test_verify_status_and_check_show_the_certificate_expiry(deployed, pebble):
    settings = https_settings(pebble)
    verify = deployed.doit("verify", **settings)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert re.search(rf"ok +HTTPS: the certificate for {NAME} expires in \d+ days",
                     verify.stdout), verify.stdout
    assert re.search(rf"ok +nginx on port 443 for {NAME} answers with release",
                     verify.stdout), verify.stdout
    status = deployed.doit("status", **settings)
    assert re.search(rf"https +the certificate for {NAME} expires in \d+ days", status.stdout)
    check = deployed.doit("check", **settings)
    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(rf"ok +HTTPS: the certificate for {NAME} expires in \d+ days",
                     check.stdout), check.stdout


def test_setup_again_with_a_valid_certificate_changes_nothing(deployed, pebble):
    result = deployed.doit("setup", **https_settings(pebble))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^ok: certificate for {NAME} expires in \d+ days", result.stdout, re.M)
    assert "changed:" not in result.stdout, result.stdout
    assert "0 changed" in result.stdout


def new_connection_each_request(pebble: Pebble):
    """A new TLS connection per request: every request during the reload is accepted by nginx
    afresh. (A kept-alive connection that is idle at the reload is closed by the old worker, as
    HTTP/1.1 allows; browsers retry such a request, requests' sessions do not.)"""
    session = pebble.session(NAME)
    session.headers["Connection"] = "close"
    return session


def test_forced_renewal_under_load_drops_no_request_and_serves_the_new_certificate(deployed,
                                                                                   pebble):
    before = served_serial(pebble)
    with deployed.admin() as admin:
        # The timer's environment: certbot.service trusts the custom ACME server's CA.
        environment = admin["systemctl"]["show", "-p", "Environment", "certbot.service"]()
        assert "REQUESTS_CA_BUNDLE=/etc/letsencrypt/acme-server-ca.pem" in environment
        with Load(pebble.https_url + "healthz", rate_per_s=40, threads=8, max_seconds=60,
                  max_requests=4000,
                  make_session=lambda: new_connection_each_request(pebble)) as load:
            while load.report.sent < 8:  # load is flowing before certbot starts
                time.sleep(0.05)
            renewed = admin["sudo"]["-n", "env",
                                    "REQUESTS_CA_BUNDLE=/etc/letsencrypt/acme-server-ca.pem",
                                    "certbot", "renew", "--force-renewal",
                                    "--no-random-sleep-on-renew"].run(retcode=None)
            at_reload = load.report.sent  # the deploy hook reloaded nginx just before
            time.sleep(3)
    after_reload = load.report.sent - at_reload
    assert renewed[0] == 0, renewed[1] + renewed[2]
    print(f"renewal under load: {load.report.sent} requests in {load.report.seconds:.1f} s, "
          f"{after_reload} after the reload, {len(load.report.failures)} failed, worst "
          f"{load.report.worst_latency_s:.2f} s")
    assert after_reload >= 8, after_reload  # requests went on across and after the reload
    assert load.report.failures == [], load.report.failures[:5]
    assert served_serial(pebble) != before  # the hook reloaded nginx with the new certificate


def test_a_failed_renewal_leaves_the_site_serving_its_certificate(deployed, pebble):
    before = served_serial(pebble)
    with deployed.admin() as admin:
        # Without the CA bundle certbot cannot trust pebble: the renewal fails.
        failed = admin["sudo"]["-n", "certbot", "renew", "--force-renewal",
                                "--no-random-sleep-on-renew"].run(retcode=None)
    assert failed[0] != 0
    assert served_serial(pebble) == before
    assert pebble.curl(NAME, "/healthz", "-f").returncode == 0


def test_hsts_is_sent_over_https_once_turned_on(deployed, pebble):
    header = "Strict-Transport-Security"
    assert header not in pebble.session(NAME).get(pebble.https_url + "healthz",
                                                  timeout=10).headers
    result = deployed.doit("setup", **https_settings(pebble, HSTS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^ok: certificate for {NAME}", result.stdout, re.M)  # not obtained again
    answer = pebble.session(NAME).get(pebble.https_url + "healthz", timeout=10)
    assert answer.ok and answer.headers[header] == "max-age=31536000"
