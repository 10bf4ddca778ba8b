"""Several servers: parallel preparation, rolling switch, a failure that stops the rollout and
returns the switched servers, an unreachable server that stops everything before any change."""

from __future__ import annotations

import json
import signal
import socket

import pytest
import requests

from scripts.remote import Target, connect
from tests.conftest import new_sandbox
from tests.integration.site import Site

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, provisioned_layer, wheel_cache):
    work = tmp_path_factory.mktemp("fleet")
    sandbox = new_sandbox(work / "sandbox")
    # Torn down whatever happens: an assertion before the yield must not leave servers up.
    try:
        sandbox.up(3, layer=provisioned_layer)
        site = Site(work, sandbox, wheel_cache)
        first = site.deploy()
        assert first.returncode == 0, first.stdout + first.stderr
        yield site
    finally:
        sandbox.down()


def releases(site) -> list[str]:
    return [requests.get(s.url + "healthz", timeout=10).json()["release"]
            for s in site.sandbox.servers()]


def remote_entries(site) -> str:
    return ",".join(f"127.0.0.1:{s.ssh_port}" for s in site.sandbox.servers())


def test_every_server_ends_on_the_new_release_with_one_line_per_server_and_step(fleet):
    fleet.change_code("fleet release")
    assert fleet.doit("-s", "build").returncode == 0
    result = fleet.doit("-s", "ship")
    assert result.returncode == 0, result.stdout + result.stderr
    assert fleet.doit("-s", "verify").returncode == 0
    assert releases(fleet) == [fleet.built_release()] * 3
    for server in fleet.sandbox.servers():
        for step in ("upload", "preflight", "switch", "restart", "finish"):
            assert any(line.startswith(f"{server.name}: ") and f" {step} " in line
                       for line in result.stdout.splitlines()), (server.name, step)


def test_sigterm_mid_batch_returns_every_server_that_switched(fleet):
    """SIGTERM while a batch of two is going live: both return (the batch in flight
    included), the third never switched, and every server ends on one release, unlocked."""
    before = releases(fleet)
    fleet.change_code("interrupted rollout")
    assert fleet.doit("-s", "build").returncode == 0
    deploy = fleet.start_doit("-s", "ship", DEPLOY_BATCH="2")
    second = fleet.sandbox.servers()[1].name
    output = []
    for line in deploy.stdout:
        output.append(line)
        if line.startswith(f"{second}: ") and " switch " in line:
            deploy.send_signal(signal.SIGTERM)
            break
    output += deploy.stdout.readlines()
    deploy.wait(timeout=120)
    text = "".join(output)
    assert deploy.returncode != 0, text
    assert releases(fleet) == before, text
    assert len(set(releases(fleet))) == 1
    assert text.count("(the deploy was interrupted)") == 2, text
    assert "lock     held" not in fleet.doit("status").stdout


def test_a_server_failing_its_health_check_stops_the_rollout_and_switched_ones_return(fleet):
    before = releases(fleet)
    broken = fleet.sandbox.servers()[1]
    admin = Target(broken.host, broken.ssh_port, "admin", fleet.sandbox.key_file,
                   fleet.sandbox.known_hosts_file)
    with connect(admin) as machine:
        # The service on this server can no longer start; its preflight still can.
        machine["sudo"]["mkdir", "-p", "/etc/systemd/system/flask-helpdesk.service.d"]()
        (machine["sudo"]["tee", "/etc/systemd/system/flask-helpdesk.service.d/broken.conf"]
         << "[Service]\nExecStartPre=/bin/false\n")()
        machine["sudo"]["systemctl", "daemon-reload"]()
        try:
            fleet.change_code("never everywhere")
            assert fleet.doit("-s", "build").returncode == 0
            result = fleet.doit("-s", "ship", DEPLOY_BATCH="1")
        finally:
            machine["sudo"]["rm", "-r", "/etc/systemd/system/flask-helpdesk.service.d"]()
            machine["sudo"]["systemctl", "daemon-reload"]()
            machine["sudo"]["systemctl", "restart", "flask-helpdesk"]()
    assert result.returncode != 0
    assert f"rollout stopped at {broken.name}" in result.stderr
    assert "1 server(s) that had switched are back on their previous release" in result.stderr
    assert releases(fleet) == before
    third = fleet.sandbox.servers()[2].name
    assert not any(line.startswith(f"{third}: ") and " switch " in line
                   for line in result.stdout.splitlines()), "the third server never switched"


def test_one_unreachable_server_fails_the_check_before_any_server_changes(fleet):
    before = releases(fleet)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    settings = {"DEPLOY_SERVER": f"{remote_entries(fleet)},127.0.0.1:{closed}",
                "SSH_KEY_FILE": str(fleet.sandbox.deploy_key_file),
                "SSH_KNOWN_HOSTS_FILE": str(fleet.sandbox.known_hosts_file),
                "PUBLIC_URL": fleet.url}
    fleet.change_code("blocked by one server")
    assert fleet.doit("-s", "build").returncode == 0
    check = fleet.doit("-s", "check", **settings)
    assert check.returncode != 0
    assert f"127.0.0.1:{closed}: connection refused" in check.stderr
    ship = fleet.doit("-s", "ship", **settings)
    assert ship.returncode != 0
    assert releases(fleet) == before


def test_a_lock_held_on_one_server_stops_the_deploy_and_frees_the_locks_taken_elsewhere(fleet):
    before = releases(fleet)
    held = fleet.sandbox.servers()[1]
    deploy_user = Target(held.host, held.ssh_port, "deploy", fleet.sandbox.deploy_key_file,
                         fleet.sandbox.known_hosts_file)
    holder = {"token": "t", "who": "olga@ci", "host": "another-machine", "pid": 1,
              "machine_id": "0" * 32, "boot_id": "another-boot",  # a live deploy elsewhere
              "started": "2026-11-28T10:00:00+00:00", "release": "abc", "action": "deploy"}
    with connect(deploy_user) as machine:
        machine["mkdir"]["/var/www/flask_helpdesk/.deploy-lock"]()
        (machine["tee"]["/var/www/flask_helpdesk/.deploy-lock/info.json"]
         << json.dumps(holder))()
    fleet.change_code("locked on one server")
    assert fleet.doit("-s", "build").returncode == 0
    result = fleet.doit("-s", "ship")
    assert result.returncode != 0
    assert f"{held.name}: another deploy holds the lock: olga@ci" in result.stderr
    assert releases(fleet) == before
    # The locks this deploy took on the other servers are gone again; only olga's remains.
    status = fleet.doit("status").stdout.splitlines()
    assert [line.split(":")[0] for line in status if "lock     held by" in line] == [held.name]
    unlock = fleet.doit("unlock")
    assert f"{held.name}: changed: removed the deploy lock of olga@ci" in unlock.stdout
    assert fleet.doit("-s", "ship").returncode == 0
    assert releases(fleet) == [fleet.built_release()] * 3


def test_rollback_acts_on_every_server(fleet):
    assert fleet.doit("-s", "ship").returncode == 0
    current = releases(fleet)
    assert len(set(current)) == 1
    result = fleet.doit("rollback")
    assert result.returncode == 0, result.stderr
    after = releases(fleet)
    assert len(set(after)) == 1 and after != current


def test_a_hosts_file_lists_servers_with_their_own_ports(fleet, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# the helpdesk fleet\n" + "\n".join(
        f"deploy@127.0.0.1:{s.ssh_port}" for s in fleet.sandbox.servers()) + "\n")
    result = fleet.doit("status", DEPLOY_HOSTS_FILE=str(hosts),
                        SSH_KEY_FILE=str(fleet.sandbox.deploy_key_file),
                        SSH_KNOWN_HOSTS_FILE=str(fleet.sandbox.known_hosts_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("service  flask-helpdesk: active") == 3


def test_the_gitlab_matrix_variant_deploys_each_server_in_its_own_job(fleet, tmp_path):
    from tests.integration.test_gitlab import job_passed, make_project, run_pipeline
    project = make_project(tmp_path / "project")
    servers = fleet.sandbox.servers()[:2]
    matrix = "".join(f"      - DEPLOY_SERVER: \"127.0.0.1:{s.ssh_port}\"\n"
                     f"        PUBLIC_URL: {s.url}\n" for s in servers)
    ci = (project / ".gitlab-ci.matrix.yml").read_text()
    start = ci.index("      - DEPLOY_SERVER: web-1")
    end = ci.index("\n\n", start)
    (project / ".gitlab-ci.matrix.yml").write_text(ci[:start] + matrix.rstrip("\n") + ci[end:])
    variables = {"SSH_PRIVATE_KEY": fleet.sandbox.deploy_key_file.read_text(),
                 "SSH_KNOWN_HOSTS": fleet.sandbox.known_hosts_file.read_text()}
    (project / ".gitlab-ci-local-variables.yml").write_text(json.dumps(variables))
    views = project / "examples" / "helpdesk" / "helpdesk" / "views.py"
    views.write_text(views.read_text() + "\n# matrix release\n")
    result = run_pipeline(project, "--file", ".gitlab-ci.matrix.yml")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    deploy_jobs = [line for line in output.splitlines()
                   if "deploy_to_server" in line and "PASS" in line]
    assert len(deploy_jobs) == 2, output[-3000:]
    assert job_passed(output, "post_deploy_verification")
    built = json.loads((project / "dist" / "helpdesk.json").read_text())["release_id"]
    assert releases(fleet)[:2] == [built, built]
