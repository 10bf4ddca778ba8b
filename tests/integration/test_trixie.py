"""A second server OS: a bare Debian 13 (trixie, Python 3.13) server, provisioned by `doit deploy`
itself, gets a package whose wheels the build chose from what the server reported."""

from __future__ import annotations

import json
import re
import tarfile

import pytest

from tests.conftest import new_sandbox
from tests.integration.site import Site

pytestmark = pytest.mark.integration

TRIXIE = {"SANDBOX_SUITE": "trixie"}


@pytest.fixture(scope="module")
def trixie(tmp_path_factory, wheel_cache):
    work = tmp_path_factory.mktemp("trixie")
    sandbox = new_sandbox(work / "sandbox", suite="trixie")
    # Torn down whatever happens: an assertion before the yield must not leave servers up.
    try:
        sandbox.up(1)
        site = Site(work, sandbox, wheel_cache)
        first = site.doit("deploy", **TRIXIE)
        yield site, first
    finally:
        sandbox.down()


def test_deploy_provisions_a_bare_debian_13_server_and_serves_the_app(trixie):
    site, first = trixie
    assert first.returncode == 0, first.stdout + first.stderr
    with site.admin() as machine:
        assert "VERSION_CODENAME=trixie" in machine["cat"]("/etc/os-release")
        assert machine["python3"]("--version").startswith("Python 3.13")
    assert "target Python 3.13 on manylinux_2_" in first.stdout
    # A bare server is the usual case, not a key problem: no advice to check SSH_KEY_FILE.
    assert re.search(r"setup: \S+: deploy cannot log in yet: SSH to deploy@[^;]+; provisioning "
                     r"as admin\n", first.stdout), first.stdout
    assert "check SSH_KEY_FILE" not in first.stdout
    assert site.served_release() == site.built_release()
    ticket = site.create_ticket("printer on fire")
    assert ticket > 0 and "printer on fire" in site.ticket_titles()


def test_the_package_carries_wheels_for_the_servers_python(trixie):
    site, _ = trixie
    record = json.loads((site.work / "dist" / "helpdesk.json").read_text())
    with tarfile.open(site.work / "dist" / record["package"]) as package:
        manifest = json.load(package.extractfile("manifest.json"))
        wheels = [name for name in package.getnames() if name.endswith(".whl")]
    assert manifest["target"]["python"] == "3.13"
    compiled = [name for name in wheels if "-cp3" in name]
    assert compiled and all("-cp313-" in name for name in compiled), wheels


def test_a_second_deploy_keeps_the_data_and_builds_nothing_new(trixie):
    site, _ = trixie
    site.create_ticket("kept across deploys")
    again = site.doit("deploy", **TRIXIE)
    assert again.returncode == 0, again.stdout + again.stderr
    # doit prints no "-- " line for a private task (_deploy_build): the build's own line is
    # what shows whether it ran.
    assert "build: release" not in again.stdout, "same sources and target: no rebuild"
    assert "kept across deploys" in site.ticket_titles()


def test_a_code_change_is_handed_over_and_a_rollback_wakes_the_parked_release(trixie):
    """The hand-over on systemd 257 and Python 3.13: the new master becomes the main process,
    the old one parks, and a rollback wakes that very process."""
    site, _ = trixie
    old = site.served_release()
    with site.admin() as machine:
        parked = int(machine["systemctl"]("show", "-P", "MainPID", "flask-helpdesk"))
    site.change_code("hand-over on trixie")
    result = site.doit("deploy", **TRIXIE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stays parked for a quick rollback" in result.stdout, result.stdout
    assert site.served_release() == site.built_release() != old
    rollback = site.doit("rollback", **TRIXIE)
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert "woke from parked" in rollback.stdout, rollback.stdout
    assert site.served_release() == old
    with site.admin() as machine:
        assert int(machine["systemctl"]("show", "-P", "MainPID", "flask-helpdesk")) == parked


def test_check_names_a_missing_python3_venv(trixie):
    site, _ = trixie
    with site.admin() as machine:
        machine.env["DEBIAN_FRONTEND"] = "noninteractive"
        # dpkg, not apt: apt would also lock the .deb cache every sandbox server shares.
        machine["sudo"]["dpkg", "--remove", "python3-venv", "python3.13-venv"]()
        try:
            check = site.doit("-s", "check", **TRIXIE)
        finally:
            machine["sudo"]["-E", "apt-get", "install", "-y", "-q", "python3-venv"]()
    assert check.returncode != 0
    assert ("FAILED   server Python 3.13 cannot create virtualenvs (ensurepip is missing); "
            "install the python3-venv package") in check.stdout
