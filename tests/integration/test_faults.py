"""Proof under load, faults and bad input: no failed request during deploys and rollbacks, a
deploy killed at any step leaves a working site and a next deploy that succeeds, bad settings
stop with one line and leave the server as it was."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from scripts.loadgen import Load
from tests.build.conftest import copy_app

pytestmark = pytest.mark.integration

STEPS = ["lock", "upload", "unpack", "venv", "backup", "migrate", "preflight", "switch",
         "restart"]


@pytest.fixture(scope="module")
def two_versions(site):
    """Two builds of the app that differ in code: A and B, each with its own dist/."""
    versions = {}
    for name in ("a", "b"):
        app_dir = copy_app(site.work / f"version-{name}" / "helpdesk")
        (app_dir / "helpdesk" / "views.py").write_text(
            (app_dir / "helpdesk" / "views.py").read_text() + f"\n# version {name}\n")
        # Their migrations run on every deploy, under the write gate (the app's pyproject.toml
        # would skip them, db.py being the same): the faults below hit that path.
        settings = {"APP_DIR": str(app_dir), "DIST_DIR": str(site.work / f"dist-{name}"),
                    "MIGRATIONS_PATHS": ""}
        assert site.doit("-s", "build", **settings).returncode == 0
        versions[name] = settings
    first = site.doit("-s", "ship", **versions["a"])
    assert first.returncode == 0, first.stdout + first.stderr
    return versions


def release_of(site, version: dict) -> str:
    import json
    return json.loads((Path(version["DIST_DIR"]) / "helpdesk.json").read_text())["release_id"]


def test_no_request_fails_during_five_deploys_and_two_rollbacks(site, two_versions):
    releases = {release_of(site, v) for v in two_versions.values()}
    with Load(site.url + "healthz", rate_per_s=40, max_requests=6000, max_seconds=240) as load:
        time.sleep(1)
        for number in range(5):
            version = two_versions["b" if number % 2 == 0 else "a"]
            result = site.doit("-s", "ship", **version)
            assert result.returncode == 0, result.stdout + result.stderr
        # Two rollbacks: to the previous good release, then forward again by name.
        assert site.doit("rollback").returncode == 0
        assert site.doit("rollback", RELEASE=release_of(site, two_versions["b"])).returncode == 0
        time.sleep(1)
    report = load.report
    print(f"load: {report.sent} requests in {report.seconds:.0f} s, {len(report.failures)} "
          f"failed, worst latency {report.worst_latency_s:.2f} s, {report.switches} switches, "
          f"releases {dict(report.releases)}")
    assert report.sent > 200
    assert report.failures == []
    assert set(report.releases) == releases
    assert report.switches >= 7


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_after_each_step_leaves_a_working_site_and_the_next_deploy_succeeds(
        site, two_versions, step):
    current = site.served_release()
    other = next(v for v in two_versions.values() if release_of(site, v) != current)
    with Load(site.url + "healthz", rate_per_s=20, max_requests=2000, max_seconds=120) as load:
        deploy = site.start_doit("-s", "ship", **other)
        printed = []
        for line in deploy.stdout:
            printed.append(line)
            if line.split()[1:2] == [step] and line.split()[0] in ("changed", "ok"):
                deploy.send_signal(signal.SIGKILL)
                break
        deploy.wait(timeout=60)
        assert deploy.returncode == -signal.SIGKILL, \
            f"the deploy never reached {step}: {''.join(printed)}"
        time.sleep(1)
        assert site.served_release() in {release_of(site, v) for v in two_versions.values()}
        # The dead deploy's lock is recognised (same machine, process gone) and broken.
        again = site.doit("-s", "ship", **other)
        assert again.returncode == 0, again.stdout + again.stderr
    assert site.served_release() == release_of(site, other)
    assert load.report.failures == [], load.report.failures


def ssh_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if int(stat[1]) == pid and cmd.endswith(b"ssh"):
                found.append(int(entry.name))
    return found


def test_cutting_ssh_during_the_upload_leaves_the_site_and_the_next_deploy_works(site, tmp_path):
    before = site.served_release()
    app_dir = copy_app(tmp_path / "big")
    (app_dir / "helpdesk" / "static" / "video.bin").write_bytes(os.urandom(15 << 20))
    big = {"APP_DIR": str(app_dir), "DIST_DIR": str(tmp_path / "dist")}
    assert site.doit("-s", "build", **big).returncode == 0
    deploy = site.start_doit("-s", "ship", **big)
    output = []
    for line in deploy.stdout:
        output.append(line)
        if " lock " in line:
            time.sleep(0.3)  # into the 15 MB upload
            for child in ssh_children(deploy.pid):
                os.kill(child, signal.SIGKILL)
            break
    output += deploy.stdout.readlines()
    deploy.wait(timeout=60)
    assert deploy.returncode != 0, "".join(output)
    assert "FAILED   upload" in "".join(output)
    assert site.served_release() == before
    status = site.doit("status").stdout
    assert "lock     held" not in status, "the lock is released over a new connection"
    again = site.doit("-s", "ship", **big)
    assert again.returncode == 0, again.stderr
    assert site.served_release() != before


def test_check_refuses_a_server_without_room_and_touches_nothing(site, two_versions):
    with site.admin() as machine:
        # A real small disk: a 2 MB filesystem where the backups go.
        machine["sudo"]["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                        "/var/backups/flask_helpdesk"]()
        try:
            before = site.doit("status").stdout
            result = site.doit("-s", "check", **two_versions["a"])
            after = site.doit("status").stdout
        finally:
            machine["sudo"]["umount", "/var/backups/flask_helpdesk"]()
    assert result.returncode != 0
    assert "/var/backups/flask_helpdesk has 2 MB free, a deploy needs" in result.stdout
    assert before == after


def test_a_failing_migration_restores_the_database_and_keeps_the_old_release(site, tmp_path):
    site.create_ticket("kept through a failed migration")
    titles = site.ticket_titles()
    before = site.served_release()
    app_dir = copy_app(tmp_path / "bad-migration")
    db = app_dir / "helpdesk" / "db.py"
    db.write_text(db.read_text().replace(
        '''    before, after = migrate(current_app.config["DATABASE"])''',
        '''    damage = connect(current_app.config["DATABASE"])
    damage.execute("DELETE FROM tickets")
    damage.commit()
    raise SystemExit("migration failed on purpose, after deleting every ticket")'''))
    settings = {"APP_DIR": str(app_dir), "DIST_DIR": str(tmp_path / "dist")}
    assert site.doit("-s", "build", **settings).returncode == 0
    result = site.doit("-s", "ship", **settings)
    assert result.returncode != 0
    assert "FAILED   migrate" in result.stdout
    assert "the database was restored exactly as it was from /var/backups/flask_helpdesk/" \
        in result.stderr
    assert site.served_release() == before
    assert site.ticket_titles() == titles


def test_a_backup_restores_with_one_command(site):
    assert site.deploy().returncode == 0  # serving, also when run alone (-k)
    site.create_ticket("in the backup")
    site.change_code("backup me")
    assert site.deploy().returncode == 0  # takes a backup holding the tickets so far
    expected = site.ticket_titles()
    backups = site.doit("backups").stdout.splitlines()
    backup = [line for line in backups if line[:8].isdigit()][-1].strip()
    site.create_ticket("after the backup")
    assert site.ticket_titles() != expected
    # The plan says what would happen, not what the tool (which ran nothing) did not answer.
    now = site.ticket_titles()
    plan = site.doit("restore", RESTORE_BACKUP=backup, DRY_RUN="1")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"from /var/backups/flask_helpdesk/{backup}; the database it would overwrite is " \
           f"first backed up" in plan.stdout, plan.stdout
    assert "would serve release" in plan.stdout and "no database" not in plan.stdout
    assert site.ticket_titles() == now
    result = site.doit("restore", RESTORE_BACKUP=backup)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the database it overwrote is saved in /var/backups/flask_helpdesk/" in result.stdout
    assert site.ticket_titles() == expected


def test_a_restore_of_a_backup_that_is_not_there_is_one_line_and_touches_nothing(site):
    assert site.deploy().returncode == 0
    serving, history = site.served_release(), site.doit("history").stdout
    result = site.doit("restore", RESTORE_BACKUP="20260101T000000000000Z-nothere")
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, output
    assert "RESTORE_BACKUP=20260101T000000000000Z-nothere is not a backup on this server; " \
           "`doit backups` lists them (the newest: " in errors[0], output
    assert "Traceback" not in output and "FAILED" not in output, output
    # Nothing locked, logged or switched: the history is as it was.
    assert site.doit("history").stdout == history and site.served_release() == serving


# -- bad input: one line naming the setting or host, non-zero, the server unchanged ------------
BAD_SETTINGS = [
    ({"DEPLOY_SERVER": ""}, "setting DEPLOY_SERVER='' is empty"),
    ({"DEPLOY_USER": ""}, "setting DEPLOY_USER=''"),
    ({"DEPLOY_PATH": ""}, "setting DEPLOY_PATH=''"),
    ({"DEPLOY_PATH": "/"}, "must not be the root directory"),
    ({"DEPLOY_PATH": "var/www"}, "must be an absolute path"),
    ({"DEPLOY_PATH": "/var/www/../etc"}, "must not contain '..'"),
    ({"DEPLOY_PATH": "/var/www/my app"}, "no spaces, quotes"),
    ({"BACKUP_PATH": "/var/backups/it's"}, "no spaces, quotes"),
    ({"BACKUP_PATH": "/tmp/x;reboot"}, "no spaces, quotes"),
    ({"BACKUP_PATH": "/tmp/$(reboot)"}, "no spaces, quotes"),
    ({"SERVICE_NAME": "flask helpdesk"}, "not a valid service name"),
    ({"APP_PORT": "five"}, "must be a port number"),
    ({"SSH_PORT": "70000"}, "must be a port number"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_bad_settings_stop_with_one_line_and_change_nothing(site, settings, message):
    before = site.doit("status").stdout
    result = site.doit("-s", "ship", **settings)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert site.doit("status").stdout == before


def _one_error(result) -> str:
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith(("error:", "FAILED"))]
    assert result.returncode != 0 and errors, result.stdout + result.stderr
    return errors[0]


def test_a_malformed_key_is_named_and_its_content_never_printed(site, tmp_path):
    key = tmp_path / "broken_key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n"
                   "-----END OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    result = site.doit("-s", "check", **site.as_remote_server(SSH_KEY_FILE=str(key)))
    line = _one_error(result)
    assert "setting SSH_KEY_FILE" in line and "malformed" in line
    assert "bm90IGEga2V5" not in result.stdout + result.stderr


def test_a_passphrase_key_without_an_agent_is_named(site, tmp_path):
    key = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(key)],
                   check=True)
    env_without_agent = {"SSH_AUTH_SOCK": ""}
    result = site.doit("-s", "check", **site.as_remote_server(SSH_KEY_FILE=str(key)),
                       **env_without_agent)
    line = _one_error(result)
    assert "protected by a passphrase and no ssh-agent is running" in line


def test_a_key_for_another_server_is_refused_by_name(site, tmp_path):
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    line = _one_error(site.doit("-s", "check", **site.as_remote_server(SSH_KEY_FILE=str(key))))
    assert "refused the key" in line and "deploy@127.0.0.1" in line


def test_a_host_that_refuses_connections(site):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    line = _one_error(site.doit("-s", "check", **site.as_remote_server(
        SSH_PORT=str(closed_port))))
    assert "connection refused" in line and f"127.0.0.1:{closed_port}" in line


def test_a_host_that_never_answers_times_out_in_bounded_time(site):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # accepts connections, never says a word
    try:
        started = time.monotonic()
        result = site.doit("-s", "check", **site.as_remote_server(
            SSH_PORT=str(silent.getsockname()[1])))
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    line = _one_error(result)
    assert "no answer within" in line or "failed" in line
    assert elapsed < 40


def test_unknown_and_changed_host_keys_are_refused(site, tmp_path):
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    line = _one_error(site.doit("-s", "check", **site.as_remote_server(
        SSH_KNOWN_HOSTS_FILE=str(empty))))
    assert "host key is not in" in line and "ssh-keyscan" in line
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    changed = tmp_path / "known_hosts_changed"
    changed.write_text(f"[127.0.0.1]:{site.server.ssh_port} "
                       f"{' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    line = _one_error(site.doit("-s", "check", **site.as_remote_server(
        SSH_KNOWN_HOSTS_FILE=str(changed))))
    assert "CHANGED" in line


def test_a_deploy_user_without_sudo_rights_is_named_by_check(site):
    with site.admin() as machine:
        machine["sudo"]["mv", "/etc/sudoers.d/flask-helpdesk-deploy", "/root/sudoers.bak"]()
        try:
            result = site.doit("-s", "check", **site.as_remote_server())
        finally:
            machine["sudo"]["mv", "/root/sudoers.bak", "/etc/sudoers.d/flask-helpdesk-deploy"]()
    assert result.returncode != 0
    assert "deploy may not run `sudo /usr/bin/systemctl restart flask-helpdesk`" in result.stdout


def test_a_package_that_does_not_match_its_manifest_is_refused(site, tmp_path):
    dist = tmp_path / "dist"
    assert site.doit("-s", "build", DIST_DIR=str(dist)).returncode == 0
    (package,) = dist.glob("helpdesk-*.tar.gz")
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    line = _one_error(site.doit("-s", "check", DIST_DIR=str(dist)))
    assert "does not match the build record" in line and "doit build" in line
