"""Data safety on a real server: writes at a steady rate through deploys, a deploy whose
migration fails, a rollback and a restore lose nothing the app acknowledged (checked by each
write's unique title, not by id); restore keeps a safety backup; retention keeps the backup
taken before a schema change; rollback history follows what people did."""

from __future__ import annotations

import json
import re
import time

import requests
import pytest

from scripts.loadgen import Load
from tests.build.conftest import copy_app

pytestmark = pytest.mark.integration

FAILING_MIGRATION = '''    damage = connect(current_app.config["DATABASE"])
    damage.execute("DELETE FROM tickets")
    damage.commit()
    raise SystemExit("migration failed on purpose, after deleting every ticket")'''
MIGRATE_CALL = '''    before, after = migrate(current_app.config["DATABASE"])'''


def build(site, name: str, edit=lambda text: text) -> dict:
    """A build of the app in its own folder: views.py marked with `name`, db.py edited."""
    app_dir = copy_app(site.work / f"version-{name}" / "helpdesk")
    views = app_dir / "helpdesk" / "views.py"
    views.write_text(views.read_text() + f"\n# version {name}\n")
    db = app_dir / "helpdesk" / "db.py"
    db.write_text(edit(db.read_text()))
    settings = {"APP_DIR": str(app_dir), "DIST_DIR": str(site.work / f"dist-{name}")}
    assert site.doit("-s", "build", **settings).returncode == 0
    return settings


def titles_in_backup(site, backup: str) -> set[str]:
    """The ticket titles a backup on the server holds (read as root, with Python's sqlite3)."""
    code = ("import json, sqlite3, sys; print(json.dumps([r[0] for r in sqlite3.connect("
            "sys.argv[1]).execute('SELECT title FROM tickets')]))")
    with site.admin() as machine:
        output = machine["sudo"]["python3", "-c", code, f"{backup}/helpdesk.sqlite3"]()
    return set(json.loads(output))


def deploy_backups(listing: str) -> list[str]:
    """The names `doit backups` lists that deploys took (not the timer's)."""
    return [line.strip() for line in listing.splitlines()
            if re.match(r"^\d{8}T", line.strip()) and not line.strip().endswith("-scheduled")]


def live_titles(site) -> set[str]:
    return {t["title"] for t in requests.get(site.url + "api/tickets", timeout=10).json()}


def test_no_acknowledged_write_is_lost_through_deploys_a_failed_migration_a_rollback_and_a_restore(
        site):
    # Every deploy migrates under the write gate, though db.py is the same (MIGRATIONS_PATHS
    # empty: always migrate; the app's pyproject.toml would skip them).
    always = {"MIGRATIONS_PATHS": ""}
    a, b = build(site, "a") | always, build(site, "b") | always
    broken = build(site, "broken", lambda text: text.replace(MIGRATE_CALL, FAILING_MIGRATION))
    first = site.doit("-s", "ship", **a)
    assert first.returncode == 0, first.stdout + first.stderr
    site.create_ticket("before the load")
    with Load(site.url + "api/tickets", rate_per_s=20, threads=4, max_requests=4000,
              max_seconds=300, writes="load") as load:
        time.sleep(1)
        for version in (b, a):
            result = site.doit("-s", "ship", **version)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "requests held" in result.stdout
        failed = site.doit("-s", "ship", **broken)
        assert failed.returncode != 0 and "FAILED   migrate" in failed.stdout
        assert "no acknowledged write was lost" in failed.stderr, failed.stderr
        acknowledged_by_now = list(load.report.acknowledged)
        missing = set(acknowledged_by_now) - live_titles(site)
        assert not missing, f"lost by the failed migration's restore: {sorted(missing)[:10]}"
        # A RESTORE_BACKUP left behind is never applied by a rollback.
        backups = deploy_backups(site.doit("backups").stdout)
        rollback = site.doit("rollback", RESTORE_BACKUP=backups[0])
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr
        assert f"warning: RESTORE_BACKUP={backups[0]} is set, but a rollback never restores" \
            in rollback.stderr
        assert "restore" not in [line.split()[1] for line in rollback.stdout.splitlines()
                                 if line.startswith(("changed", "ok"))]
        time.sleep(1)
        restore = site.doit("restore", RESTORE_BACKUP=backups[-1])
        assert restore.returncode == 0, restore.stdout + restore.stderr
        history = site.doit("history").stdout.splitlines()
        actions = [line.split()[2] for line in history if line.startswith("20")]
        assert actions[:2] == ["restore", "rollback"], history
        time.sleep(1)
    report = load.report
    safety = re.search(r"the database it overwrote is saved in (\S+)", restore.stdout).group(1)
    kept = live_titles(site) | titles_in_backup(site, safety)
    lost = [title for title in report.acknowledged if title not in kept]
    print(f"writes: {report.sent} sent, {len(report.acknowledged)} acknowledged (201), "
          f"{len(lost)} lost, {len(report.failures)} failed; worst latency "
          f"{report.worst_latency_s:.2f} s; safety backup {safety}")
    assert report.sent > 100
    assert report.failures == []
    assert lost == []
    restored = f"/var/backups/flask_helpdesk/{backups[-1]}"
    assert "before the load" in titles_in_backup(site, restored)
    assert "before the load" in live_titles(site), "the restored backup is live"


def test_retention_keeps_the_backup_before_a_schema_change(site):
    """A migration that adds a table, then more deploys than BACKUPS_KEEP: the last backup of
    the old schema stays."""
    added = '''    """
    CREATE TABLE retention_probe (id INTEGER PRIMARY KEY);
    """,
)'''
    schema_change = build(site, "schema", lambda text: text.replace("\n)\n", "\n" + added + "\n",
                                                                    1))
    keep = {"BACKUPS_KEEP": "2", "BACKUPS_KEEP_DAYS": "0", "KEEP_RELEASES": "1"}
    assert site.doit("-s", "ship", **build(site, "retention-base"), **keep).returncode == 0
    result = site.doit("-s", "ship", **schema_change, **keep)
    assert result.returncode == 0, result.stdout + result.stderr
    before_change = re.search(r"changed  backup .* (/var/backups/\S+)", result.stdout).group(1)
    for number in range(4):
        version = build(site, f"after-{number}", lambda text: text.replace(
            "\n)\n", "\n" + added + "\n", 1))
        result = site.doit("-s", "ship", **version, **keep)
        assert result.returncode == 0, result.stdout + result.stderr
    listed = site.doit("backups").stdout
    assert before_change.rsplit("/", 1)[1] in listed
    # The newest 2 (one of them also the newest the previous release served) and the one
    # before the change: everything else went.
    assert len(deploy_backups(listed)) == 3, listed


def test_a_release_rolled_back_from_is_never_a_later_rollback_target(site):
    """Deploy A, B; roll back to A; deploy C with KEEP_RELEASES=1: `doit rollback` goes to A."""
    versions = {name: build(site, f"history-{name}") for name in "ABC"}
    releases = {name: json.loads((site.work / f"dist-history-{name}" / "helpdesk.json")
                                 .read_text())["release_id"] for name in "ABC"}
    for name in "AB":
        assert site.doit("-s", "ship", **versions[name]).returncode == 0
    assert site.doit("rollback").returncode == 0
    assert site.served_release() == releases["A"]
    shipped = site.doit("-s", "ship", **versions["C"], KEEP_RELEASES="1")
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    rollback = site.doit("rollback")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert site.served_release() == releases["A"]


def test_the_backup_timer_fires_and_its_backup_restores_to_the_same_tickets(site):
    assert site.doit("-s", "ship", **build(site, "timer")).returncode == 0
    site.create_ticket("in the scheduled backup")
    expected = site.ticket_titles()
    drop_in = "/etc/systemd/system/flask-helpdesk-backup.timer.d"
    with site.admin() as machine:
        sudo = machine["sudo"]
        assert sudo["systemctl", "is-enabled", "flask-helpdesk-backup.timer"]().strip() == \
            "enabled"
        # The timer itself fires, a second after it is restarted (its schedule is daily).
        sudo["mkdir", "-p", drop_in]()
        (sudo["tee", f"{drop_in}/now.conf"] << "[Timer]\nOnActiveSec=1\nRandomizedDelaySec=0\n")()
        try:
            sudo["systemctl", "daemon-reload"]()
            sudo["systemctl", "restart", "flask-helpdesk-backup.timer"]()
            deadline = time.monotonic() + 30
            scheduled = []
            while not scheduled and time.monotonic() < deadline:
                time.sleep(1)
                scheduled = [line.strip() for line in site.doit("backups").stdout.splitlines()
                             if line.strip().endswith("-scheduled")]
            journal = sudo["journalctl", "-u", "flask-helpdesk-backup", "--no-pager", "-n", "20"](
                retcode=None)
            listing = sudo["ls", "-la", "/var/backups/flask_helpdesk/scheduled",
                           "/var/www/flask_helpdesk/.deploy-tool"](retcode=None)
        finally:
            sudo["rm", "-r", drop_in]()
            sudo["systemctl", "daemon-reload"]()
    assert scheduled, f"the timer made no backup within 30 s:\n{journal}\n{listing}"
    site.create_ticket("after the scheduled backup")
    result = site.doit("restore", RESTORE_BACKUP=scheduled[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"/var/backups/flask_helpdesk/scheduled/{scheduled[-1]}" in result.stdout
    assert site.ticket_titles() == expected


def test_backup_pull_copies_the_newest_backup_here_verified(site, tmp_path):
    for name in ("pull-1", "pull-2"):  # the second deploy backs up the first one's database
        assert site.doit("-s", "ship", **build(site, name)).returncode == 0
    newest = site.doit("backups").stdout
    names = [line.strip() for line in newest.splitlines() if re.match(r"^\d{8}T", line.strip())]
    pulled = site.doit("backup-pull", BACKUP_PULL_DIR=str(tmp_path))
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "sha256 verified" in pulled.stdout
    (copy,) = tmp_path.glob(f"*/{names[-1]}/helpdesk.sqlite3")
    import sqlite3
    with sqlite3.connect(copy) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    again = site.doit("backup-pull", BACKUP_PULL_DIR=str(tmp_path), BACKUP=names[0])
    assert again.returncode == 0 and list(tmp_path.glob(f"*/{names[0]}/helpdesk.sqlite3"))
