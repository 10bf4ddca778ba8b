"""Bring your own app: examples/notes, written the common Flask way (an application factory, a
plain-text /ping, logging to stderr, its own `flask --app notes init-db`), deployed to a server
provisioned for the defaults, changed and rolled back with its data kept."""

from __future__ import annotations

import re

import pytest
import requests

from tests.conftest import new_sandbox
from tests.integration.site import Site

pytestmark = pytest.mark.integration

# Its own settings; the server was provisioned with the defaults (MIGRATE_COMMAND among them).
NOTES = {"HEALTH_PATH": "/ping", "MIGRATE_COMMAND": "flask --app notes init-db"}


@pytest.fixture(scope="module")
def notes(tmp_path_factory, provisioned_layer, wheel_cache):
    work = tmp_path_factory.mktemp("notes")
    sandbox = new_sandbox(work / "sandbox")
    # Torn down whatever happens: an assertion before the yield must not leave servers up.
    try:
        sandbox.up(1, layer=provisioned_layer)
        site = Site(work, sandbox, wheel_cache, app="notes")
        first = site.doit("deploy", **NOTES)
        yield site, first
    finally:
        sandbox.down()


def add_note(site: Site, body: str) -> None:
    requests.post(site.url, data={"body": body}, timeout=10).raise_for_status()


def page(site: Site) -> str:
    response = requests.get(site.url, timeout=10)
    response.raise_for_status()
    return response.text


def heading(site: Site) -> str:
    return re.search(r"<h1>(.*?)</h1>", page(site)).group(1)


def test_first_deploy_passes_verify_with_a_plain_health_page_and_journal_logs(notes):
    site, first = notes
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"changed +migrate .* flask --app notes init-db", first.stdout)
    assert "/ping from here answers 2xx (it reports no release)" in first.stdout
    assert "guide: tail app.log: /var/log/flask_helpdesk/app.log is empty; the app logs to " \
           "the journal" in first.stdout
    assert requests.get(site.url + "ping", timeout=10).text == "pong\n"


def test_the_apps_stderr_logging_reaches_the_journal(notes):
    site, _ = notes
    add_note(site, "journal me")
    with site.admin() as machine:
        journal = machine["sudo"]["journalctl", "-u", "flask-helpdesk", "--no-pager", "-n",
                                  "200"]()
    assert "note added (10 characters)" in journal


def test_a_change_deploys_and_a_rollback_goes_back_with_the_data_kept(notes):
    site, _ = notes
    add_note(site, "written on v1")
    assert heading(site) == "Notes"
    first_release = site.built_release()
    with site.edited("notes/templates/index.html",
                     lambda text: text.replace("<h1>Notes</h1>", "<h1>Notes, v2</h1>")):
        changed = site.doit("deploy", **NOTES)
        assert changed.returncode == 0, changed.stdout + changed.stderr
        assert site.built_release() != first_release
        assert heading(site) == "Notes, v2"
        assert "written on v1" in page(site)
        add_note(site, "written on v2")
    back = site.doit("rollback", **NOTES)
    assert back.returncode == 0, back.stdout + back.stderr
    assert heading(site) == "Notes"
    assert "written on v1" in page(site) and "written on v2" in page(site)


def test_an_empty_migrate_command_deploys_without_migrating(notes):
    site, _ = notes
    with site.edited("notes/templates/index.html", lambda text: text + "<!-- v3 -->\n"):
        result = site.doit("deploy", **{**NOTES, "MIGRATE_COMMAND": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"ok +migrate .*no MIGRATE_COMMAND", result.stdout), result.stdout
    assert "written on v1" in page(site)


def test_the_default_migrate_command_the_app_lacks_is_named_with_what_to_do(notes):
    # A newcomer's first deploy of their own app without setting MIGRATE_COMMAND: the default
    # `flask --app wsgi migrate` is no command of theirs. The journal of the migrate unit also
    # holds an earlier run's exception, which must not explain this failure.
    site, _ = notes
    before = page(site)
    broken = lambda text: text.replace("import logging", "import logging\nimport yaml", 1)  # noqa: E731
    with site.edited("notes/__init__.py", broken):
        first = site.doit("deploy", **NOTES)
    assert first.returncode != 0 and "No module named 'yaml'" in first.stderr, first.stderr
    with site.edited("notes/templates/index.html", lambda text: text + "<!-- v4 -->\n"):
        result = site.doit("deploy", HEALTH_PATH="/ping")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stdout + result.stderr
    assert "setting MIGRATE_COMMAND='flask --app wsgi migrate': Error: No such command " \
           "'migrate'.; set it to the app's own (`flask --app notes init-db`), or empty for " \
           "none" in errors[0], errors[0]
    assert "yaml" not in errors[0]
    assert page(site) == before
