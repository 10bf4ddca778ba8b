"""`doit deploy`, verify and rollback end to end on a provisioned sandbox server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from scripts.deploy.lock import machine_identity
from tests.integration.helpers import health_answers_503

pytestmark = pytest.mark.integration


def test_first_deploy_serves_the_release_and_prints_where_to_open_it(site):
    result = site.doit("deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    release = site.built_release()
    assert site.served_release() == release
    assert f"open {site.url}" in result.stdout
    for step in ("upload", "unpack", "venv", "migrate", "preflight", "switch", "restart"):
        assert f"changed  {step}" in result.stdout or f"ok       {step}" in result.stdout, step
    assert "FAILED" not in result.stdout


def test_rollback_with_a_single_good_release_says_there_is_nothing(site):
    result = site.doit("rollback")
    assert result.returncode != 0
    assert "nothing to roll back to" in result.stderr


def test_same_package_again_does_nothing_quickly(site):
    started = time.monotonic()
    result = site.doit("-s", "ship")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "already current and serving; nothing to do" in result.stdout
    assert elapsed < 5, elapsed  # generous bound: the benchmark records the real figure


def test_a_code_change_deploys_a_new_release_reusing_the_venv(site):
    before = site.served_release()
    site.change_code("second release")
    result = site.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    after = site.built_release()
    assert after != before and site.served_release() == after


def test_migrations_run_only_when_their_files_change_with_migrations_paths(site):
    watched = {"MIGRATIONS_PATHS": "helpdesk/db.py"}
    site.change_code("code only, migrations as before")
    result = site.ship(**watched)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok       migrate" in result.stdout and "skipped: helpdesk/db.py unchanged" in \
        result.stdout
    db = site.app_dir / "helpdesk" / "db.py"
    db.write_text(db.read_text() + "\n# a migration file changed\n")
    result = site.ship(**watched)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "changed  migrate" in result.stdout and "flask --app wsgi migrate" in result.stdout
    site.change_code("a path that is not in the app")
    wrong = {"MIGRATIONS_PATHS": "helpdesk/no_such_file.py"}
    check = site.doit("-s", "check", **wrong)
    assert check.returncode != 0
    assert "setting MIGRATIONS_PATHS: helpdesk/no_such_file.py is not in the package" in \
        check.stderr
    result = site.ship(**wrong)
    assert result.returncode != 0
    assert "setting MIGRATIONS_PATHS: helpdesk/no_such_file.py is not in release" in result.stderr
    assert site.served_release() != site.built_release()  # nothing switched


def test_the_bundled_app_declares_its_migrations_so_unchanged_ones_are_skipped(site):
    """No MIGRATIONS_PATHS given: examples/helpdesk/pyproject.toml declares helpdesk/db.py. A
    code-only change skips the migrate step and serves; a changed db.py runs the migrations;
    the same files with another MIGRATE_COMMAND run them too."""
    live = site.served_release()
    site.change_code("code only, migrations as the app declares them")
    result = site.ship()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^ok +migrate .*skipped: helpdesk/db.py unchanged since {live}, and so "
                     rf"is MIGRATE_COMMAND", result.stdout, re.M), result.stdout
    assert "requests held" not in result.stdout
    assert site.served_release() == site.built_release() != live
    live = site.served_release()
    db = site.app_dir / "helpdesk" / "db.py"
    db.write_text(db.read_text() + "\n# the app's migrations changed\n")
    result = site.ship()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^changed +migrate .*flask --app wsgi migrate \(helpdesk/db.py changed "
                     rf"since {live}; requests held", result.stdout, re.M), result.stdout
    assert site.served_release() == site.built_release()
    live = site.served_release()
    site.change_code("the same migrations, run by another command")
    another = {"MIGRATE_COMMAND": "python -m flask --app wsgi migrate"}
    result = site.ship(**another)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^changed +migrate .*python -m flask --app wsgi migrate \(MIGRATE_COMMAND "
                     rf"changed since {live}; requests held", result.stdout, re.M), result.stdout
    assert site.served_release() == site.built_release()


def test_ship_output_reuses_the_venv_for_a_code_only_change(site):
    site.change_code("third release")
    result = site.ship()
    assert result.returncode == 0, result.stderr
    assert "reused shared/venvs/" in result.stdout
    assert site.served_release() == site.built_release()


def test_tickets_survive_deploys_and_rollbacks(site):
    site.create_ticket("printer on fire")
    site.change_code("fourth release")
    assert site.deploy().returncode == 0
    assert "printer on fire" in site.ticket_titles()
    assert site.doit("rollback").returncode == 0
    assert "printer on fire" in site.ticket_titles()
    assert site.doit("-s", "ship").returncode == 0  # forward again to the built release
    assert "printer on fire" in site.ticket_titles()


def test_rollback_goes_to_the_previous_good_release_then_to_a_named_one(site):
    status = site.doit("status").stdout
    current = site.served_release()
    previous = next(line.split()[1] for line in status.splitlines()
                    if line.startswith("previous"))
    result = site.doit("rollback")
    assert result.returncode == 0, result.stderr
    assert site.served_release() == previous
    named = site.doit("rollback", RELEASE=current)
    assert named.returncode == 0, named.stderr
    assert site.served_release() == current
    unknown = site.doit("rollback", RELEASE="doesnotexist")
    assert unknown.returncode != 0 and "not on this server" in unknown.stderr


def test_a_release_that_cannot_import_never_serves(site):
    before = site.served_release()
    with site.edited("wsgi.py", lambda good: "raise ImportError('broken on purpose')\n" + good):
        result = site.deploy()
    assert result.returncode != 0
    # Its migrations import it first, or the preflight when they are skipped (db.py as live):
    # the deploy stops there, before any switch.
    assert "FAILED   migrate" in result.stdout or "FAILED   preflight" in result.stdout
    assert "migrations of" in result.stderr or "does not start" in result.stderr
    assert "the old release keeps serving" in result.stderr
    assert site.served_release() == before


def test_a_release_with_a_failing_health_check_never_serves(site):
    before = site.served_release()
    with site.edited("helpdesk/views.py", health_answers_503):
        # 503 is what a starting app may answer: it is waited out, for HEALTH_TIMEOUT_S.
        result = site.deploy(HEALTH_TIMEOUT_S="5")
    assert result.returncode != 0
    assert "FAILED   preflight" in result.stdout and "HTTP 503" in result.stderr
    assert "HEALTH_TIMEOUT_S=5" in result.stderr
    assert site.served_release() == before
    history = site.doit("status").stdout
    assert "failed" in history


def test_a_held_lock_refuses_a_second_deploy_with_the_holders_details(site):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = {"token": "t", "who": "olga@ci", "host": os.uname().nodename,
                **machine_identity(), "pid": holder.pid,
                "pid_start": open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[19],
                "started": "2026-11-27T10:00:00+00:00", "release": "abc", "action": "deploy"}
        with site.deploy_user() as machine:
            machine["mkdir"]["/var/www/flask_helpdesk/.deploy-lock"]()
            (machine["tee"]["/var/www/flask_helpdesk/.deploy-lock/info.json"]
             << json.dumps(info))()
        site.change_code("while locked")
        assert site.doit("-s", "build").returncode == 0
        refused = site.doit("-s", "ship")
        assert refused.returncode != 0
        assert "another deploy holds the lock: olga@ci" in refused.stderr
        assert f"pid {holder.pid}" in refused.stderr and "doit unlock" in refused.stderr
    finally:
        holder.kill()
        holder.wait()
    # Its holder died on this machine: the next deploy recognises that and breaks the lock.
    result = site.doit("-s", "ship")
    assert result.returncode == 0, result.stderr
    assert "breaking the lock of a deploy that died" in result.stdout
    assert site.served_release() == site.built_release()


def test_two_deploys_at_once_one_is_refused(site):
    site.change_code("race")
    assert site.doit("-s", "build").returncode == 0
    racers = [site.start_doit("-s", "ship") for _ in range(2)]
    outcomes = [(racer.wait(timeout=120), racer.communicate()[0]) for racer in racers]
    statuses = sorted(status for status, _ in outcomes)
    refused = [output for status, output in outcomes if status != 0]
    assert statuses[0] == 0
    if refused:  # they overlapped: the loser names the winner
        assert "another deploy holds the lock" in refused[0]
    assert site.served_release() == site.built_release()


def test_a_deploy_killed_with_sigkill_leaves_the_old_release_serving(site):
    before = site.served_release()
    site.change_code("killed")
    assert site.doit("-s", "build").returncode == 0
    deploy = site.start_doit("-s", "ship")
    for line in deploy.stdout:
        if "backup" in line:  # killed after the backup step, before the switch
            deploy.send_signal(signal.SIGKILL)
            break
    deploy.wait()
    assert site.served_release() == before
    status = site.doit("status").stdout
    assert "lock     held by" in status
    unlock = site.doit("unlock")
    assert unlock.returncode == 0 and "removed the deploy lock of" in unlock.stdout
    again = site.doit("-s", "ship")
    assert again.returncode == 0, again.stderr
    assert site.served_release() == site.built_release()


def test_dry_run_prints_the_commands_and_changes_nothing(site):
    before = site.served_release()
    site.change_code("dry run")
    assert site.doit("-s", "build").returncode == 0
    result = site.doit("-s", "ship", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert "    $ sudo -n systemctl restart flask-helpdesk" in result.stdout
    assert "    $ python3 " in result.stdout
    assert site.served_release() == before


def test_verify_failure_rolls_back_by_itself(site):
    assert site.doit("-s", "ship").returncode == 0
    after = site.served_release()
    with site.admin() as machine:
        machine["sudo"]["systemctl", "stop", "nginx"]()
        try:
            result = site.doit("-s", "verify")
        finally:
            machine["sudo"]["systemctl", "start", "nginx"]()
    assert result.returncode != 0
    assert "FAILED   nginx on port 80" in result.stdout
    assert "rolling back by itself" in result.stdout
    assert site.served_release() != after


def test_status_and_logs_read_well(site):
    status = site.doit("status")
    assert status.returncode == 0
    for word in ("service  flask-helpdesk: active", "current ", "previous ", "releases "):
        assert word in status.stdout
    assert " deploy " in status.stdout and " rollback " in status.stdout
    logs = site.doit("logs")
    assert logs.returncode == 0
    assert "==> /var/log/nginx/flask_helpdesk_access.log <==" in logs.stdout
    assert "GET /healthz" in logs.stdout


def test_the_guides_commands_work_as_written_for_the_deploy_user(site):
    with site.deploy_user() as machine:
        assert "active (running)" in machine["sudo"]["-n", "systemctl", "status",
                                                     "flask-helpdesk"]()
        assert machine["curl"]["-fsS", "http://localhost:5000"]()
        assert machine["curl"]["-fsS", "http://localhost/"]()
        # No sudo rule runs anything as www-data for deploy (R19): deploy runs the venv's
        # python itself, and the guide's `sudo -u www-data …` is the setup account's.
        assert "Python 3.11" in machine["/var/www/flask_helpdesk/venv/bin/python"]["--version"]()
        refused = machine["sudo"]["-n", "-u", "www-data",
                                  "/var/www/flask_helpdesk/venv/bin/python", "--version"].run(
                                      retcode=None)
        assert refused[0] != 0
        assert ":5000" in machine["sh"]["-c", "ss -tulpn | grep :5000"]()
    with site.admin() as machine:
        assert "Python 3.11" in machine["sudo"]["-n", "-u", "www-data",
                                                "/var/www/flask_helpdesk/venv/bin/python",
                                                "--version"]()
    assert requests.get(site.url, timeout=10).ok


def test_a_deploys_verify_takes_nginx_t_from_its_check_and_verify_alone_runs_it(site):
    """`sudo nginx -t` runs once per `doit deploy` (in check; ship changes no nginx file);
    `doit verify` alone still runs every guide command."""
    site.change_code("nginx -t once")
    deployed = site.doit("deploy")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "ok       nginx configuration valid" in deployed.stdout
    assert "ok       guide: sudo nginx -t: passed in this deploy's check" in deployed.stdout
    alone = site.doit("verify")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "ok       guide: sudo nginx -t\n" in alone.stdout
    assert "passed in this deploy's check" not in alone.stdout


def test_sigterm_mid_deploy_releases_the_lock_and_keeps_the_old_release(site):
    before = site.served_release()
    site.change_code("terminated")
    assert site.doit("-s", "build").returncode == 0
    deploy = site.start_doit("-s", "ship")
    for line in deploy.stdout:
        if " unpack " in line:
            deploy.send_signal(signal.SIGTERM)
            break
    deploy.communicate(timeout=60)
    assert deploy.returncode != 0
    assert site.served_release() == before
    assert "lock     held" not in site.doit("status").stdout
    assert site.doit("-s", "ship").returncode == 0


def test_app_secrets_reach_the_app_and_are_never_printed(site):
    secret = "s3cr3t-value-never-printed"
    env_file = site.work / "app.env"
    env_file.write_text(f"SECRET_KEY={secret}\n")
    site.change_code("secrets")
    result = site.deploy(APP_ENV_FILE=str(env_file))
    dry = site.doit("-s", "ship", APP_ENV_FILE=str(env_file), DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    for output in (result.stdout, result.stderr, dry.stdout, dry.stderr,
                   site.doit("status").stdout, site.doit("logs").stdout):
        assert secret not in output
    with site.admin() as machine:
        stat = machine["sudo"]["stat", "-c", "%a %U", "/etc/flask-helpdesk/app.env"]()
        content = machine["sudo"]["cat", "/etc/flask-helpdesk/app.env"]()
        deploy_log = machine["sudo"]["cat", "/var/www/flask_helpdesk/deploy-log.jsonl"]()
    assert stat.split() == ["600", "deploy"]
    assert secret in content and secret not in deploy_log
