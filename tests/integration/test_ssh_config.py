"""DEPLOY_SERVER names a `Host` of the user's SSH configuration: port, user, key and known_hosts
come from that configuration only, and a ProxyJump bastion (a second sandbox server) is the one
way to the target."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.deploy.lock import machine_identity, process_start_time
from scripts.remote import connect
from scripts.sandbox import processes, root_target
from tests.conftest import new_sandbox
from tests.integration.site import Site
from tests.integration.test_gitlab import job_passed, make_project, run_pipeline
from tests.integration.test_notify_history import inbox  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

BASTION_ADDRESS = "192.0.2.1"  # TEST-NET-1, only on the veth pair made here
TARGET_ADDRESS = "192.0.2.2"


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_deploy_rollback_and_status_through_an_alias_from_the_configuration_only(site, inbox,
                                                                                 tmp_path):
    config = write_config(tmp_path / "ssh_config", f"""
Host ceoa
  HostName 127.0.0.1
  Port {site.server.ssh_port}
  User deploy
  IdentityFile {site.sandbox.deploy_key_file}
  UserKnownHostsFile {site.sandbox.known_hosts_file}
""")
    # No SSH_PORT, DEPLOY_USER, SSH_KEY_FILE or SSH_KNOWN_HOSTS_FILE: the alias says it all.
    alias = {"DEPLOY_SERVER": "ceoa", "SSH_CONFIG": str(config), "PUBLIC_URL": site.url,
             "NOTIFY_WEBHOOK_URL": f"{inbox.url}/hooks/team", "NOTIFY_LANGUAGE": "en"}
    check = site.doit("-s", "build", **alias), site.doit("-s", "check", **alias)
    assert check[1].returncode == 0, check[1].stdout + check[1].stderr
    assert f"SSH as deploy@127.0.0.1:{site.server.ssh_port}, host key verified" in check[1].stdout

    first = site.deploy(**alias)
    assert first.returncode == 0, first.stdout + first.stderr
    first_release = site.served_release()
    site.change_code("through the alias")
    second = site.deploy(**alias)
    assert second.returncode == 0, second.stdout + second.stderr
    assert site.served_release() == site.built_release() != first_release

    back = site.doit("rollback", **alias)
    assert back.returncode == 0, back.stdout + back.stderr
    assert site.served_release() == first_release

    status = site.doit("status", **alias)
    assert status.returncode == 0, status.stderr
    assert f"current  {first_release}" in status.stdout

    history = site.doit("history", **alias).stdout.splitlines()
    rows = [line.split()[1:3] for line in history if line.startswith("20")]
    assert rows == [["ceoa", "rollback"], ["ceoa", "deploy"], ["ceoa", "deploy"]], history
    texts = inbox.texts("/hooks/team")
    assert texts and all("servers: ceoa" in text for text in texts), texts
    assert not any("127.0.0.1" in text for text in texts)

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = {"token": "t", "who": "olga@laptop", "host": os.uname().nodename,
                **machine_identity(), "pid": holder.pid, "pid_start": process_start_time(holder.pid),
                "started": "2026-11-29T08:00:00+00:00", "release": "abc", "action": "deploy"}
        with site.deploy_user() as machine:
            machine["mkdir"]["/var/www/flask_helpdesk/.deploy-lock"]()
            (machine["tee"]["/var/www/flask_helpdesk/.deploy-lock/info.json"]
             << json.dumps(info))()
        refused = site.doit("-s", "ship", **alias)
        assert refused.returncode != 0
        assert "error: ceoa: another deploy holds the lock: olga@laptop" in refused.stderr
    finally:
        holder.kill()
        holder.wait()
    assert site.doit("unlock", **alias).returncode == 0


@pytest.fixture(scope="module")
def relayed(tmp_path_factory, provisioned_layer, wheel_cache):
    """A provisioned target whose SSH is reachable only from a bare bastion server: a veth pair
    joins their network namespaces, and the target's loopback SSH forward is ended."""
    work = tmp_path_factory.mktemp("relayed")
    bastion_box = new_sandbox(work / "bastion")
    target_box = new_sandbox(work / "target")
    bastion_side, target_side = f"jb{os.getpid()}", f"jt{os.getpid()}"
    try:
        bastion_box.up(1)
        target_box.up(1, layer=provisioned_layer)
        bastion, target = bastion_box.servers()[0], target_box.servers()[0]
        run = lambda *argv: subprocess.run(argv, check=True, capture_output=True)  # noqa: E731
        run("ip", "link", "add", bastion_side, "netns", str(bastion.init_pid), "type", "veth",
            "peer", "name", target_side, "netns", str(target.init_pid))
        for server, side, address in ((bastion, bastion_side, BASTION_ADDRESS),
                                      (target, target_side, TARGET_ADDRESS)):
            run("nsenter", "-t", str(server.init_pid), "-n", "ip", "addr", "add",
                f"{address}/24", "dev", side)
            run("nsenter", "-t", str(server.init_pid), "-n", "ip", "link", "set", side, "up")
        ssh_forward = next(h for h in target.helpers
                           if h.marker.startswith(f"TCP-LISTEN:{target.ssh_port},"))
        processes.end_group(ssh_forward.pgid, ssh_forward.marker)
        yield Site(work, target_box, wheel_cache), bastion_box
    finally:
        for box in (target_box, bastion_box):
            box.down()


def test_a_deploy_through_a_proxyjump_bastion(relayed, tmp_path):
    site, bastion_box = relayed
    bastion, target = bastion_box.servers()[0], site.server
    with pytest.raises(ConnectionRefusedError):  # no way in but the bastion
        socket.create_connection(("127.0.0.1", target.ssh_port), timeout=2).close()
    config = write_config(tmp_path / "ssh_config", f"""
Host bastion
  HostName 127.0.0.1
  Port {bastion.ssh_port}
  User admin
  IdentityFile {bastion_box.key_file}
Host app
  HostName {TARGET_ADDRESS}
  ProxyJump bastion
  IdentityFile {site.sandbox.deploy_key_file}
  IdentityFile {site.sandbox.key_file}
""")
    # One known_hosts file for every hop, as CI's SSH_KNOWN_HOSTS gives it.
    known_hosts = tmp_path / "known_hosts"
    target_line = f"{TARGET_ADDRESS} {target.host_key}\n"
    known_hosts.write_text(target_line)
    via = {"DEPLOY_SERVER": "app", "SSH_CONFIG": str(config), "PUBLIC_URL": site.url,
           "SSH_KNOWN_HOSTS_FILE": str(known_hosts)}
    assert site.doit("-s", "build", **via).returncode == 0
    unknown_bastion = site.doit("-s", "check", **via)
    assert unknown_bastion.returncode != 0
    assert (f"SSH to app (deploy@{TARGET_ADDRESS}:22 via bastion): its host key (or the bastion "
            f"bastion's) is not in {known_hosts}") in unknown_bastion.stderr

    known_hosts.write_text(bastion.known_hosts_line() + "\n" + target_line)
    check = site.doit("-s", "check", **via)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SSH as deploy@{TARGET_ADDRESS}:22 via bastion, host key verified" in check.stdout
    ship = site.ship(**via)
    assert ship.returncode == 0, ship.stdout + ship.stderr
    assert any(line.split()[:2] == ["changed", "upload"] for line in ship.stdout.splitlines()), \
        ship.stdout
    verify = site.doit("-s", "verify", **via)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert site.served_release() == site.built_release()

    # A HostName the bastion cannot reach is told apart from a bastion that cannot be reached.
    with config.open("a") as more:
        more.write("Host ghost\n  HostName 192.0.2.3\n  ProxyJump bastion\n")
    ghost = site.doit("status", **{**via, "DEPLOY_SERVER": "ghost"})
    assert ghost.returncode != 0
    assert "error: SSH to ghost (deploy@192.0.2.3:22 via bastion): the bastion bastion cannot " \
           "reach 192.0.2.3:22" in ghost.stderr, ghost.stderr

    # Provisioning's own connection (server_setup.sh and conf/ uploaded) goes the same way, and
    # the deploy key it would install is the public half of the alias's first IdentityFile.
    setup = site.doit("setup", "--check", SETUP_USER="admin", **via)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "setup: 1 server(s), 0 would change" in setup.stdout, setup.stdout


def test_the_pipeline_deploys_through_the_bastion_with_the_documented_variables(relayed,
                                                                               tmp_path):
    site, bastion_box = relayed
    bastion = bastion_box.servers()[0]
    # The job's one key (SSH_PRIVATE_KEY, in its ssh-agent) is offered to both hops.
    with connect(root_target(bastion_box, bastion)) as machine:
        (machine["tee"]["-a", "/home/admin/.ssh/authorized_keys"]
         << Path(f"{site.sandbox.deploy_key_file}.pub").read_text())()
    project = make_project(tmp_path / "project")
    config = (f"Host bastion\n  HostName 127.0.0.1\n  Port {bastion.ssh_port}\n  User admin\n"
              f"Host app\n  HostName {TARGET_ADDRESS}\n  ProxyJump bastion\n")
    variables = {"DEPLOY_SERVER": "app", "PUBLIC_URL": site.url,
                 "SSH_CONFIG": {"type": "file", "values": {"*": config}},
                 "SSH_PRIVATE_KEY": {"type": "file",
                                     "values": {"*": site.sandbox.deploy_key_file.read_text()}},
                 "SSH_KNOWN_HOSTS": f"{bastion.known_hosts_line()}\n"
                                    f"{TARGET_ADDRESS} {site.server.host_key}\n"}
    (project / ".gitlab-ci-local-variables.yml").write_text(json.dumps(variables, indent=2))
    result = run_pipeline(project)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for job in ("pre_deploy_checks", "deploy_to_server", "post_deploy_verification"):
        assert job_passed(output, job), f"{job} did not pass:\n{output[-4000:]}"
    assert f"SSH as deploy@{TARGET_ADDRESS}:22 via bastion" in output
    assert site.served_release() in (project / "dist" / "helpdesk.json").read_text()
