"""`doit setup` on a fresh sandbox server: what the guide's step 1 and security section ask."""

from __future__ import annotations

import re

import pytest

from scripts.remote import Target, connect
from scripts.sandbox import Sandbox
from tests.conftest import new_sandbox
from tests.integration.helpers import doit, outside_probe, script_lines

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """One bare server, provisioned once by the first `doit setup` of this module."""
    work = tmp_path_factory.mktemp("setup")
    sandbox: Sandbox = new_sandbox(work / "sandbox")
    # Torn down whatever happens: an assertion before the yield must not leave servers up.
    try:
        (server,) = sandbox.up(1)
        first = doit(work, sandbox.state_dir, "setup")
        yield sandbox, server, work, first
    finally:
        sandbox.down()


def admin(sandbox, server) -> Target:
    return Target(server.host, server.ssh_port, "admin", sandbox.key_file,
                  sandbox.known_hosts_file)


def deploy(sandbox, server) -> Target:
    return Target(server.host, server.ssh_port, "deploy", sandbox.deploy_key_file,
                  sandbox.known_hosts_file)


def etc_checksums(machine) -> str:
    return machine["sudo"]["find", "/etc", "-type", "f", "-exec", "sha256sum", "{}", "+"]()


def test_first_setup_changes_the_server_and_leaves_its_services_active(fresh):
    sandbox, server, _, first = fresh
    assert first.returncode == 0, first.stdout + first.stderr
    lines = script_lines(first.stdout)
    assert any(line.startswith("changed: install ") for line in lines)
    assert "changed: user deploy created" in lines
    assert any("10-flask-deploy-hardening.conf" in line for line in lines)
    with connect(admin(sandbox, server)) as machine:
        for unit in ("nginx", "fail2ban", "ssh"):
            assert machine["systemctl"]["is-active", unit]().strip() == "active", unit
        assert "Status: active" in machine["sudo"]["ufw", "status"]()


def test_second_run_says_only_ok_and_changes_no_file_under_etc(fresh):
    sandbox, server, work, _ = fresh
    with connect(admin(sandbox, server)) as machine:
        before = etc_checksums(machine)
        again = doit(work, sandbox.state_dir, "setup")
        after = etc_checksums(machine)
    assert again.returncode == 0, again.stdout + again.stderr
    lines = script_lines(again.stdout)
    assert lines and all(line.startswith("ok:") for line in lines), lines
    assert before == after


def test_check_after_setup_reports_nothing_to_do(fresh):
    sandbox, _, work, _ = fresh
    check = doit(work, sandbox.state_dir, "setup", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert not [line for line in script_lines(check.stdout) if not line.startswith("ok:")]
    assert "0 would change" in check.stdout


def test_check_on_a_changed_server_reports_and_changes_nothing(fresh):
    sandbox, server, work, _ = fresh
    with connect(admin(sandbox, server)) as machine:
        machine["sudo"]["chmod", "666", "/etc/logrotate.d/flask_helpdesk"]()
        check = doit(work, sandbox.state_dir, "setup", "--check")
        mode = machine["stat"]["-c", "%a", "/etc/logrotate.d/flask_helpdesk"]().strip()
        assert "would change: /etc/logrotate.d/flask_helpdesk" in check.stdout
        assert mode == "666"
        assert doit(work, sandbox.state_dir, "setup").returncode == 0
        assert machine["stat"]["-c", "%a", "/etc/logrotate.d/flask_helpdesk"]().strip() == "644"


ALLOWED = [
    ["nginx", "-t"],
    ["systemctl", "status", "nginx"],
    ["systemctl", "status", "flask-helpdesk"],
    ["journalctl", "-u", "flask-helpdesk", "--no-pager", "-n", "50"],
    ["journalctl", "-u", "flask-helpdesk", "--no-pager", "-n", "20"],
    ["tail", "-n", "100", "/var/log/nginx/flask_helpdesk_error.log"],
]
REFUSED = [
    ["cat", "/etc/shadow"],
    ["systemctl", "restart", "ssh"],
    ["systemctl", "start", "flask-helpdesk", "ssh"],
    ["tail", "-n", "5", "/etc/shadow"],
    ["journalctl", "-u", "ssh", "--no-pager", "-n", "20"],
    ["bash", "-c", "id"],
    ["-u", "www-data", "id"],
]


def test_deploy_user_logs_in_with_its_key_and_has_exactly_the_needed_sudo(fresh):
    sandbox, server, _, _ = fresh
    with connect(deploy(sandbox, server)) as machine:
        assert machine["echo"]["SSH works!"]().strip() == "SSH works!"
        for argv in ALLOWED:
            status, out, err = machine["sudo"]["-n", *argv].run(retcode=None)
            assert "password is required" not in err, f"sudo {' '.join(argv)} refused: {err}"
            assert status in (0, 3), f"sudo {' '.join(argv)}: {status} {err}"  # 3: inactive
        for argv in REFUSED:
            status, _, err = machine["sudo"]["-n", *argv].run(retcode=None)
            assert status != 0 and "password is required" in err, f"sudo {' '.join(argv)}"
        listing = machine["sudo"]["-n", "-l"]()
    assert "NOPASSWD: ALL" not in listing
    assert "/usr/bin/systemctl restart flask-helpdesk" in listing
    # Nothing runs as www-data through sudo (R19): no rule, no rule tool, no apt hook.
    assert "(www-data)" not in listing
    with connect(admin(sandbox, server)) as machine:
        left = machine["sh"]["-c", "ls /etc/sudoers.d /usr/local/sbin /etc/apt/apt.conf.d"]()
    assert "python-rule" not in left and "deploy-python" not in left


def test_passwords_and_root_logins_are_refused(fresh):
    sandbox, server, _, _ = fresh
    import subprocess
    password_try = subprocess.run(
        ["ssh", "-p", str(server.ssh_port), "-o", f"UserKnownHostsFile={sandbox.known_hosts_file}",
         "-o", "PubkeyAuthentication=no", "-o", "BatchMode=yes",
         "-o", "PreferredAuthentications=password,keyboard-interactive",
         "deploy@127.0.0.1", "true"], capture_output=True, text=True, timeout=30)
    assert password_try.returncode == 255
    assert "Permission denied (publickey)" in password_try.stderr
    with pytest.raises(Exception, match="refused the key"):
        connect(Target(server.host, server.ssh_port, "root", sandbox.key_file,
                       sandbox.known_hosts_file))
    with connect(admin(sandbox, server)) as machine:  # the admin way in stays open
        assert "PermitRootLogin no" in machine["sudo"]["sshd", "-T"]().replace(
            "permitrootlogin no", "PermitRootLogin no")


def test_from_outside_only_ssh_and_http_are_reachable(fresh):
    sandbox, server, _, _ = fresh
    with connect(admin(sandbox, server)) as machine:
        # Something listening on every address at 5000: only the firewall keeps it in.
        machine["sudo"]["systemd-run", "--unit", "probe-5000", "python3", "-m", "http.server",
                        "5000", "--bind", "0.0.0.0"]()
        try:
            machine["sh"]["-c", "for i in 1 2 3 4 5 6 7 8 9 10; do "
                                "curl -s -o /dev/null http://127.0.0.1:5000/ && exit 0; "
                                "sleep 0.3; done; exit 1"]()
            with outside_probe(server.init_pid) as probe:
                states = probe([22, 80, 443, 5000, 5001, 8080])
        finally:
            machine["sudo"]["systemctl", "stop", "probe-5000"].run(retcode=None)
    assert {port for port, state in states.items() if state == "open"} == {22, 80}, states
    assert states[5000] == "filtered", "ufw must drop 5000, not merely find it closed"


def test_app_unit_scores_2_5_or_lower_in_systemd_analyze_security(fresh):
    sandbox, server, _, _ = fresh
    with connect(admin(sandbox, server)) as machine:
        report = machine["sudo"]["systemd-analyze", "security", "flask-helpdesk.service"](
            retcode=None)
    score = float(re.search(r"Overall exposure level for flask-helpdesk.service: ([\d.]+)",
                            report).group(1))
    print(f"systemd-analyze security flask-helpdesk.service: {score}")
    assert score <= 2.5


def test_fail2ban_sshd_jail_works_from_the_journal_and_logrotate_config_is_valid(fresh):
    sandbox, server, _, _ = fresh
    with connect(admin(sandbox, server)) as machine:
        assert "Status for the jail: sshd" in machine["sudo"]["fail2ban-client", "status", "sshd"]()
        machine["sudo"]["logrotate", "--debug", "/etc/logrotate.d/flask_helpdesk"]()


def test_root_without_allow_root_is_refused_and_bad_input_changes_nothing(fresh):
    sandbox, server, work, _ = fresh
    with connect(admin(sandbox, server)) as machine:
        machine["mkdir"]["-p", "/tmp/s"]()
        from scripts.provision import _upload
        _upload(machine, "/tmp/s")
        status, out, err = machine["sudo"]["env", "-u", "SUDO_USER", "bash",
                                           "/tmp/s/server_setup.sh"].run(retcode=None)
        assert status == 1 and "refusing to run as root" in err
        before = etc_checksums(machine)
        status, out, err = machine["bash"]["/tmp/s/server_setup.sh", "--deploy-path",
                                           "/var/../etc"].run(retcode=None)
        assert status == 1 and "must not contain '..'" in err
        assert etc_checksums(machine) == before
    bad = doit(work, sandbox.state_dir, "setup", DEPLOY_PATH="relative")
    assert bad.returncode != 0
    assert "setting DEPLOY_PATH='relative' must be an absolute path" in bad.stderr
