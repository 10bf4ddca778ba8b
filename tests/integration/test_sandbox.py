"""Sandbox servers are real Debian 12 machines: SSH with checked host keys, systemd, apt, and a
firewall of their own; `up` reuses them, `down` leaves nothing behind."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from scripts.errors import ToolkitError
from scripts.remote import connect
from scripts.sandbox import processes, root_target
from scripts.sandbox.servers import _mount_points

pytestmark = pytest.mark.integration


def test_two_servers_boot_and_answer_ssh_with_checked_host_keys(sandbox, root_targets):
    servers = sandbox.servers()
    assert len(servers) == 2
    assert len({s.host_key for s in servers}) == 2, "each copy must have its own host keys"
    for server, target in zip(servers, root_targets):
        with connect(target) as machine:
            assert machine["hostname"]().strip() == server.name


def test_unknown_host_key_is_refused(sandbox, root_targets, tmp_path):
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    with pytest.raises(ToolkitError, match=r"its host key is not in .*ssh-keyscan"):
        connect(replace(root_targets[0], known_hosts_file=empty_known_hosts))


def test_systemd_is_running(root_targets):
    for target in root_targets:
        with connect(target) as machine:
            state = machine["systemctl"]["is-system-running"].run(retcode=None)[1].strip()
            failed = machine["systemctl"]["--failed", "--no-legend", "--plain"]().strip()
            assert state in ("running", "degraded"), state
            assert state == "running" or failed, "degraded must come with failed units"
            assert state == "running", f"degraded; failed units:\n{failed}"


def test_apt_reaches_the_debian_mirror_through_the_bridge(sandbox, root_targets):
    with connect(root_targets[0]) as machine:
        output = machine["apt-get"]["update"]()
        # The mirror this machine's own apt uses (or SANDBOX_MIRROR), never one named in code.
        assert f"Get:1 {sandbox.mirror.archive} bookworm" in output or \
            f"Hit:1 {sandbox.mirror.archive} bookworm" in output, output


def test_firewall_inside_a_server_leaves_the_hosts_rules_alone(root_targets):
    host_rules_before = subprocess.run(["iptables", "-S"], capture_output=True, text=True,
                                       check=True).stdout
    with connect(root_targets[1]) as machine:
        machine["apt-get"]["update", "-q"]()
        machine.env["DEBIAN_FRONTEND"] = "noninteractive"
        machine["apt-get"]["install", "-y", "-q", "ufw"]()
        machine["ufw"]["--force", "enable"]()
        assert "Status: active" in machine["ufw"]["status"]()
        assert "ufw-" in machine["iptables"]["-S"]()
    host_rules_after = subprocess.run(["iptables", "-S"], capture_output=True, text=True,
                                      check=True).stdout
    assert host_rules_after == host_rules_before
    assert "ufw-" not in host_rules_after


def test_up_again_reuses_the_running_servers(sandbox):
    before = sandbox.servers()
    after = sandbox.up(2)
    assert [(s.name, s.nspawn_pid, s.ssh_port) for s in after] == \
           [(s.name, s.nspawn_pid, s.ssh_port) for s in before]


def test_state_file_lists_ports_key_and_known_hosts(sandbox):
    known_hosts = sandbox.known_hosts_file.read_text()
    for server in sandbox.servers():
        assert f"[127.0.0.1]:{server.ssh_port} ssh-ed25519 " in known_hosts
        assert server.http_port != server.ssh_port
    assert sandbox.key_file.exists()


def test_unhealthy_server_is_replaced_on_up(fresh_sandbox):
    (server,) = fresh_sandbox.up(1)
    processes.end_group(server.helpers[0].pgid, server.helpers[0].marker)  # its SSH forwarder
    assert not fresh_sandbox.is_healthy(server)
    (replacement,) = fresh_sandbox.up(1)
    assert fresh_sandbox.is_healthy(replacement)
    assert replacement.nspawn_pid != server.nspawn_pid
    assert not processes.alive(server.nspawn_pid)


def test_down_leaves_no_process_mount_or_copy(fresh_sandbox):
    (server,) = fresh_sandbox.up(1)
    server_dir = Path(server.root_dir).parent
    started = [server.nspawn_pid, server.init_pid] + [h.pgid for h in server.helpers]
    assert all(processes.alive(pid) for pid in started)

    assert fresh_sandbox.down() == [server.name]

    assert not any(processes.alive(pid) for pid in started)
    assert not [pid for helper in server.helpers
                for pid in processes.group_members(helper.pgid) if processes.alive(pid)]
    assert not [m for m in _mount_points() if m.startswith(str(server_dir))]
    assert not server_dir.exists()
    assert fresh_sandbox.servers() == []
    assert not any(server.name in " ".join(processes.cmdline(int(p.name)))
                   for p in Path("/proc").iterdir() if p.name.isdigit())


def test_root_target_connects_as_root(sandbox):
    server = sandbox.servers()[0]
    with connect(root_target(sandbox, server)) as machine:
        assert machine["id"]["-u"]().strip() == "0"
