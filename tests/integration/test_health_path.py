"""HEALTH_PATH travels with each release: a rollback checks the old release where it was
deployed to answer, even after the setting changed with a newer release."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.integration

READY_ROUTE = '\n\n@bp.get("/ready")\ndef ready():\n    return "ready\\n"\n'


def test_a_rollback_checks_the_old_releases_health_path(site):
    first = site.deploy()  # HEALTH_PATH=/healthz, the default
    assert first.returncode == 0, first.stdout + first.stderr
    old = site.served_release()
    # A newer release answers on /ready, and the setting follows it; the old one has no /ready.
    with site.edited("helpdesk/views.py", lambda text: text + READY_ROUTE):
        second = site.deploy(HEALTH_PATH="/ready")
        assert second.returncode == 0, second.stdout + second.stderr
        assert requests.get(site.url + "ready", timeout=10).text == "ready\n"
        back = site.doit("rollback", HEALTH_PATH="/ready")
    assert back.returncode == 0, back.stdout + back.stderr
    assert site.served_release() == old
    assert requests.get(site.url + "ready", timeout=10).status_code == 404
