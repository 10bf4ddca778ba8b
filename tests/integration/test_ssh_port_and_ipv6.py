"""Servers reached another way than the sandbox's default (issue 13): sshd listening on 2222
inside the server, and a server addressed by IPv6 (`DEPLOY_SERVER=[::1]:<port>`) or by an SSH
configuration alias holding '_'."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.sandbox import Sandbox
from scripts.settings import load_settings
from tests.integration.helpers import outside_probe, script_lines
from tests.integration.site import Site

pytestmark = pytest.mark.integration


def shaped_sandbox(state_dir: Path, **shape) -> Sandbox:
    settings = load_settings(env_file=Path("/nonexistent"))
    return Sandbox(state_dir, settings.sandbox_cache, settings.sandbox_mirror, **shape)


@pytest.fixture(scope="module")
def on_2222(tmp_path_factory, wheel_cache):
    """A bare server whose sshd listens on 2222 (the sandbox's forward ends there)."""
    work = tmp_path_factory.mktemp("ssh2222")
    sandbox = shaped_sandbox(work / "sandbox", inside_ssh_port=2222)
    try:
        sandbox.up(1)
        yield Site(work, sandbox, wheel_cache)
    finally:
        sandbox.down()


def test_sshd_on_2222_setup_and_deploy_work_and_the_firewall_keeps_2222_open(on_2222):
    site = on_2222
    # doit setup passes --ssh-port 22 here (the sandbox's forwards end on the server's SSH
    # port): the server itself must find 2222, from sshd and from its own session.
    setup = site.doit("setup")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "changed: ufw allows 2222/tcp" in script_lines(setup.stdout)
    deployed = site.deploy()
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert site.served_release() == site.built_release()
    with site.admin() as admin:
        ufw = admin["sudo"]["ufw", "status"]()
        sshd = admin["sudo"]["sshd", "-T"]().splitlines()
    assert "Status: active" in ufw and re.search(r"^2222/tcp +ALLOW", ufw, re.M), ufw
    assert "port 2222" in sshd
    # From outside (traffic that crosses the firewall, unlike the sandbox's loopback forward).
    with outside_probe(site.server.init_pid) as probe:
        states = probe([2222, 80, 5000])
    assert states == {2222: "open", 80: "open", 5000: "filtered"}, states
    again = site.doit("setup")
    assert again.returncode == 0, again.stdout + again.stderr
    lines = script_lines(again.stdout)
    assert lines and all(line.startswith("ok:") for line in lines), lines


@pytest.fixture(scope="module")
def on_ipv6(tmp_path_factory, provisioned_layer, wheel_cache):
    """A provisioned server that also answers on [::1] (SSH and HTTP, same ports)."""
    work = tmp_path_factory.mktemp("ipv6")
    sandbox = shaped_sandbox(work / "sandbox", ipv6=True)
    try:
        sandbox.up(1, layer=provisioned_layer)
        yield Site(work, sandbox, wheel_cache)
    finally:
        sandbox.down()


def test_deploy_to_an_ipv6_address_and_to_an_alias_with_an_underscore(on_ipv6, tmp_path):
    site = on_ipv6
    server = site.server
    public_url = f"http://[::1]:{server.http_port}/"
    ipv6 = {"DEPLOY_SERVER": f"[::1]:{server.ssh_port}",
            "SSH_KEY_FILE": str(site.sandbox.deploy_key_file),
            "SSH_KNOWN_HOSTS_FILE": str(site.sandbox.known_hosts_file), "PUBLIC_URL": public_url}
    deployed = site.deploy(**ipv6)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"http://[::1]:{server.http_port}/healthz" in deployed.stdout, deployed.stdout
    assert site.served_release() == site.built_release()

    config = tmp_path / "ssh_config"
    config.write_text(f"Host web_v6\n  HostName ::1\n  Port {server.ssh_port}\n  User deploy\n"
                      f"  IdentityFile {site.sandbox.deploy_key_file}\n"
                      f"  UserKnownHostsFile {site.sandbox.known_hosts_file}\n")
    config.chmod(0o600)
    status = site.doit("status", DEPLOY_SERVER="web_v6", SSH_CONFIG=str(config))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"current  {site.built_release()}" in status.stdout
