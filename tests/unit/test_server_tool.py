"""The server-side helper, run here against a temporary DEPLOY_PATH: the release layout, the
lock, shipping, switching, pruning, backups. (Integration tests run it on real servers.)"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "scripts" / "deploy" / "server_tool.py"


def tool(*args, expect_ok=True):
    result = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                            text=True, timeout=60)
    if expect_ok:
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    return result.stderr


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "app"
    for folder in ("releases", "shared/instance", "shared/uploads", "shared/venvs", "packages"):
        (root / folder).mkdir(parents=True)
    return root


def make_package(root: Path, release: str, extra: dict | None = None) -> str:
    name = f"app-{release}.tar.gz"
    files = {"wsgi.py": b"app = None\n", "manifest.json":
             json.dumps({"release_id": release, "requirements_sha256": "r",
                         "wheels": []}).encode(), **(extra or {})}
    with tarfile.open(root / "packages" / name, "w:gz") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return name


def release(root: Path, release_id: str) -> None:
    """A release as deploy leaves it, minus the venv."""
    tool("unpack", root, make_package(root, release_id), release_id)


def test_probe_of_a_fresh_layout(root):
    state = tool("probe", root)
    assert state["current"] is None and state["good"] == [] and state["lock"] is None
    assert state["layout"] is True and state["python"] == "%d.%d" % sys.version_info[:2]


def test_the_lock_is_taken_once_and_released_by_its_token(root):
    assert tool("lock", root, json.dumps({"token": "a", "who": "me"}))["taken"]
    second = tool("lock", root, json.dumps({"token": "b", "who": "you"}))
    assert not second["taken"] and second["holder"]["who"] == "me"
    assert tool("probe", root)["lock"]["who"] == "me"
    assert not tool("unlock", root, "b")["released"]
    assert tool("unlock", root, "a")["released"]
    assert tool("probe", root)["lock"] is None


def test_a_damaged_upload_is_refused_and_removed(root):
    (root / "packages" / "p.tar.gz.partial").write_bytes(b"damaged")
    error = tool("accept-package", root, "p.tar.gz", "0" * 64, expect_ok=False)
    assert "upload was damaged" in error
    assert not (root / "packages" / "p.tar.gz.partial").exists()


def test_unpack_is_idempotent_and_compiles_bytecode(root):
    name = make_package(root, "r1")
    assert tool("unpack", root, name, "r1")["changed"] is True
    assert (root / "releases" / "r1" / "wsgi.py").exists()
    assert list((root / "releases" / "r1" / "__pycache__").glob("wsgi*.pyc"))
    assert tool("unpack", root, name, "r1")["changed"] is False


def test_unpack_refuses_unsafe_paths(root):
    name = make_package(root, "r1", {"../escape.py": b"x"})
    assert "unsafe entry" in tool("unpack", root, name, "r1", expect_ok=False)
    assert not (root / "escape.py").exists() and not (root / "releases" / "r1").exists()


def test_shared_links_and_the_env_file_written_in_place(root, tmp_path):
    release(root, "r1")
    env_file = tmp_path / "app.env"
    assert "run `doit setup`" in tool("link-shared", root, "r1", env_file, expect_ok=False)
    env_file.touch(mode=0o600)
    inode = env_file.stat().st_ino
    assert tool("link-shared", root, "r1", env_file)["changed"]
    release_dir = root / "releases" / "r1"
    assert os.readlink(release_dir / "instance") == "../../shared/instance"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert env_file.read_text().startswith("SECRET_KEY=")
    assert not tool("link-shared", root, "r1", env_file)["changed"]
    wanted = "SECRET_KEY=mine\nMAIL=x\n"
    (root / "shared" / ".env.upload").write_text(wanted)
    assert tool("link-shared", root, "r1", env_file, "uploaded")["changed"]
    assert env_file.read_text() == wanted and env_file.stat().st_mode & 0o777 == 0o600
    (root / "shared" / ".env.upload").write_text(wanted)
    assert not tool("link-shared", root, "r1", env_file, "uploaded")["changed"]
    assert not (root / "shared" / ".env.upload").exists()
    assert env_file.stat().st_ino == inode  # written in place: its folder is root's


def test_an_uploaded_env_file_without_secret_key_keeps_the_servers_key(root, tmp_path):
    # APP_ENV_FILE holding only the app's own settings must not drop the SECRET_KEY the first
    # deploy generated (the app would sign sessions with its fallback, or not start).
    release(root, "r1")
    env_file = tmp_path / "app.env"
    env_file.touch(mode=0o600)
    tool("link-shared", root, "r1", env_file)
    key_line = env_file.read_text()
    assert key_line.startswith("SECRET_KEY=") and len(key_line) > 40
    (root / "shared" / ".env.upload").write_text("WIKI_TITLE=Mine")
    assert tool("link-shared", root, "r1", env_file, "uploaded")["changed"]
    assert env_file.read_text() == "WIKI_TITLE=Mine\n" + key_line
    (root / "shared" / ".env.upload").write_text("WIKI_TITLE=Mine")
    assert not tool("link-shared", root, "r1", env_file, "uploaded")["changed"]
    # An upload that names its own key is taken as it is.
    (root / "shared" / ".env.upload").write_text("export SECRET_KEY=mine\nWIKI_TITLE=Mine\n")
    assert tool("link-shared", root, "r1", env_file, "uploaded")["changed"]
    assert env_file.read_text() == "export SECRET_KEY=mine\nWIKI_TITLE=Mine\n"
    # A first deploy with an upload that has no key gets a random one.
    fresh = tmp_path / "fresh.env"
    fresh.touch(mode=0o600)
    (root / "shared" / ".env.upload").write_text("WIKI_TITLE=Mine\n")
    tool("link-shared", root, "r1", fresh, "uploaded")
    lines = fresh.read_text().splitlines()
    assert lines[0] == "WIKI_TITLE=Mine" and lines[1].startswith("SECRET_KEY=")
    assert len(lines[1]) == len("SECRET_KEY=") + 64


def test_a_dry_run_compares_an_upload_without_key_with_the_server_file_minus_its_key():
    import sys
    sys.path.insert(0, str(TOOL.parent))
    from server_tool import with_secret_key, without_secret_key
    upload = "WIKI_TITLE=Mine"
    on_server = with_secret_key(upload, "SECRET_KEY=abc\n")
    assert on_server == "WIKI_TITLE=Mine\nSECRET_KEY=abc\n"
    assert without_secret_key(with_secret_key(upload, "", "x")) == without_secret_key(on_server)
    assert without_secret_key(with_secret_key("OTHER=1\n", "", "x")) != \
        without_secret_key(on_server)


def test_the_env_file_is_never_written_through_a_link(root, tmp_path):
    release(root, "r1")
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    (tmp_path / "app.env").symlink_to(victim)
    assert "missing" in tool("link-shared", root, "r1", tmp_path / "app.env", expect_ok=False)
    assert victim.read_text() == "root's\n"


def test_names_that_are_not_release_or_backup_names_are_refused(root):
    for name in (".", "..", "../x", "a/b", "", "-r"):
        assert "not a release name" in tool("switch", root, name, expect_ok=False), name
        assert "not a release name" in tool("set-next", root, name, expect_ok=False), name
    assert "not a backup name" in tool("restore", root, str(root / ".."), expect_ok=False)


def test_switch_is_atomic_and_reports_the_previous_release(root):
    release(root, "r1")
    release(root, "r2")
    assert tool("switch", root, "r1") == {"changed": True, "previous": None}
    assert tool("switch", root, "r2") == {"changed": True, "previous": "r1"}
    assert os.readlink(root / "current") == "releases/r2"
    assert tool("switch", root, "r2")["changed"] is False
    assert "not on this server" in tool("set-next", root, "r9", expect_ok=False)


def test_set_next_says_whether_the_migrations_are_those_of_the_live_release(root):
    migrations = {"app/db.py": b"MIGRATIONS = [1]\n", "migrations/001.sql": b"create\n"}
    tool("unpack", root, make_package(root, "r1", migrations), "r1")
    assert tool("set-next", root, "r1", "app/db.py")["migrations_unchanged"] is False  # none live
    tool("switch", root, "r1")
    tool("unpack", root, make_package(root, "r2", {**migrations, "views.py": b"v2\n"}), "r2")
    assert tool("set-next", root, "r2", "app/db.py,migrations")["migrations_unchanged"] is True
    assert os.readlink(root / "next") == "releases/r2"
    changed = {**migrations, "migrations/002.sql": b"alter\n"}
    tool("unpack", root, make_package(root, "r3", changed), "r3")
    assert tool("set-next", root, "r3", "app/db.py")["migrations_unchanged"] is True
    assert tool("set-next", root, "r3", "migrations")["migrations_unchanged"] is False
    assert tool("set-next", root, "r3", "")["migrations_unchanged"] is False  # unset: always run
    edited = {**migrations, "app/db.py": b"MIGRATIONS = [1, 2]\n"}
    tool("unpack", root, make_package(root, "r4", edited), "r4")
    assert tool("set-next", root, "r4", "app/db.py")["migrations_unchanged"] is False
    error = tool("set-next", root, "r4", "app/missing.py", expect_ok=False)
    assert "setting MIGRATIONS_PATHS: app/missing.py is not in release r4" in error


def test_migrations_with_another_migrate_command_are_not_unchanged_and_a_plan_agrees(root):
    migrations = {"app/db.py": b"MIGRATIONS = [1]\n"}
    digests = json.dumps({"app/db.py": {"": hashlib.sha256(b"MIGRATIONS = [1]\n").hexdigest()}})
    tool("unpack", root, make_package(root, "r1", migrations), "r1")
    tool("set-next", root, "r1", "app/db.py", "flask --app wsgi migrate")
    tool("switch", root, "r1")
    tool("unpack", root, make_package(root, "r2", {**migrations, "views.py": b"v2\n"}), "r2")
    same = tool("set-next", root, "r2", "app/db.py", "flask --app wsgi migrate")
    assert same["migrations_unchanged"] is True and same["current"] == "r1"
    assert tool("plan", root, "r2", "key", root / "app.env", digests,
                "flask --app wsgi migrate")["migrations"]["migrations_unchanged"] is True
    other = tool("set-next", root, "r2", "app/db.py", "flask --app wsgi upgrade")
    assert other["migrations_unchanged"] is False
    assert other["command_changed"] is True and other["migrations_changed"] == []
    planned = tool("plan", root, "r2", "key", root / "app.env", digests,
                   "flask --app wsgi upgrade")["migrations"]
    assert planned == {key: other[key] for key in planned}
    edited = json.dumps({"app/db.py": {"": hashlib.sha256(b"MIGRATIONS = [2]\n").hexdigest()}})
    assert tool("plan", root, "r2", "key", root / "app.env", edited, "flask --app wsgi migrate"
                )["migrations"]["migrations_changed"] == ["app/db.py"]
    # A live release deployed before its command was kept: its migrations run once more.
    (root / "releases" / "r1" / ".migrate-command").unlink()
    assert tool("set-next", root, "r2", "app/db.py", "flask --app wsgi migrate")[
        "command_changed"] is True


def test_set_next_keeps_the_deploys_migrate_command_in_the_release(root):
    release(root, "r1")
    tool("set-next", root, "r1", "", "touch migrated-by-r1")
    command_file = root / "next" / ".migrate-command"
    assert command_file.read_text() == "touch migrated-by-r1\n"
    assert command_file.stat().st_mode & 0o777 == 0o640  # the app user reads it via its group
    # What the -migrate unit runs: /bin/sh DEPLOY_PATH/next/.migrate-command, in next/.
    subprocess.run(["/bin/sh", str(command_file)], cwd=root / "next", check=True)
    assert (root / "releases" / "r1" / "migrated-by-r1").exists()
    tool("set-next", root, "r1", "", "")  # a new MIGRATE_COMMAND, or none, with any deploy
    assert command_file.read_text() == "\n"


def test_rollback_walks_good_releases_in_recorded_order(root):
    for name in ("r1", "r2", "r3"):
        release(root, name)
        tool("switch", root, name)
        tool("finish", root, name, 5)
    assert tool("previous-good", root) == {"current": "r3", "previous": "r2"}
    tool("switch", root, "r2")
    assert tool("previous-good", root)["previous"] == "r1"
    tool("switch", root, "r1")
    assert tool("previous-good", root)["previous"] is None


def test_a_release_rolled_back_from_is_never_the_target_of_a_later_rollback(root):
    """Deploy A, B; roll back to A; deploy C with KEEP_RELEASES=1: rollback goes to A."""
    for name in ("A", "B"):
        release(root, name)
        tool("switch", root, name)
        tool("finish", root, name, 5)
    tool("switch", root, "A")
    tool("rolled-back", root, "A", "B", '{"action": "rollback", "release": "A"}')
    assert tool("history", root, 5)["entries"] == [{"action": "rollback", "release": "A"}]
    release(root, "C")
    tool("switch", root, "C")
    tool("finish", root, "C", 1)
    assert tool("previous-good", root) == {"current": "C", "previous": "A"}
    assert sorted(os.listdir(root / "releases")) == ["A", "C"], "pruning kept what served"


def test_prune_counts_only_good_releases_and_keeps_current_and_previous(root):
    for name in ("r1", "r2", "r3", "r4"):
        release(root, name)
        tool("switch", root, name)
        tool("finish", root, name, 10)
    release(root, "failed")  # unpacked, never went live
    (root / "shared" / "venvs" / "orphan").mkdir()
    tool("switch", root, "r2")  # rolled back: r1 is the previous good one
    removed = tool("prune", root, 1)["removed"]
    assert sorted(os.listdir(root / "releases")) == ["r1", "r2", "r4"]
    assert set(removed) == {"r3", "failed"}
    assert not (root / "shared" / "venvs" / "orphan").exists()
    assert tool("probe", root)["good"] == ["r1", "r2", "r4"]


def test_backup_and_restore_keep_the_data(root, tmp_path):
    database = root / "shared" / "instance" / "helpdesk.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (v TEXT)")
        connection.execute("INSERT INTO t VALUES ('before')")
    backups = tmp_path / "backups"
    backups.mkdir()
    backup = tool("backup", root, backups, "r1", 2)["backup"]
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE t SET v = 'after'")
    assert tool("restore", root, backup)["restored"] == ["helpdesk.sqlite3"]
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT v FROM t").fetchall() == [("before",)]
    for _ in range(3):
        tool("backup", root, backups, "r1", 2)
    assert len(tool("backups", backups)["backups"]) == 2


def test_no_database_no_backup(root, tmp_path):
    assert tool("backup", root, tmp_path, "r1", 3)["backup"] is None


def _database(root: Path) -> Path:
    database = root / "shared" / "instance" / "helpdesk.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
    return database


def _rows(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute("SELECT v FROM t ORDER BY rowid")]


def _fake_sudo(tmp_path: Path, script: str) -> dict:
    """PATH with a `sudo` that runs `script` (python) instead of starting the migrate unit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "sudo"
    fake.write_text(f"#!{sys.executable}\n{script}")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_failed_migration_under_the_write_gate_restores_an_exact_backup(root, tmp_path):
    database = _database(root)
    with sqlite3.connect(database) as connection:
        connection.execute("INSERT INTO t VALUES ('acknowledged')")
    backups = tmp_path / "backups"
    backups.mkdir()
    # The fake migration damages the data, records whether a request could have got in (a
    # shared lock on the gate, as gunicorn's pre_request hook takes), and fails.
    env = _fake_sudo(tmp_path, f"""
import fcntl, os, sqlite3, sys
gate = os.open({str(root / "shared" / "write-gate")!r}, os.O_RDONLY)
try:
    fcntl.flock(gate, fcntl.LOCK_SH | fcntl.LOCK_NB)
    print("a request got in", file=open({str(tmp_path / "probe")!r}, "w"))
except BlockingIOError:
    print("requests held", file=open({str(tmp_path / "probe")!r}, "w"))
with sqlite3.connect({str(database)!r}) as connection:
    connection.execute("DELETE FROM t")
sys.exit(1)
""")
    result = subprocess.run([sys.executable, str(TOOL), *map(str, ("migrate-held", root, backups, "r2",
                                                              5, 0, "app-migrate"))], capture_output=True, text=True, env=env,
                            timeout=60)
    answer = json.loads(result.stdout)
    assert answer["migrated"] is False and answer["restored"] == ["helpdesk.sqlite3"]
    assert (tmp_path / "probe").read_text().strip() == "requests held"
    assert _rows(database) == ["acknowledged"]
    gate = root / "shared" / "write-gate"
    assert gate.stat().st_mode & 0o777 == 0o640


def test_taking_the_gate_waits_for_requests_in_flight(root, tmp_path):
    import fcntl
    database = _database(root)
    backups = tmp_path / "backups"
    backups.mkdir()
    good = tool("backup", root, backups, "r1", 5)["backup"]
    with sqlite3.connect(database) as connection:
        connection.execute("INSERT INTO t VALUES ('written by a request in flight')")
    gate = root / "shared" / "write-gate"
    gate.touch()
    request = os.open(gate, os.O_RDONLY)
    fcntl.flock(request, fcntl.LOCK_SH)  # a request still running
    restore = subprocess.Popen([sys.executable, str(TOOL), "restore", root, good, backups],
                               stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            restore.wait(timeout=0.5)
    finally:
        os.close(request)
    answer = json.loads(restore.communicate(timeout=30)[0])
    assert _rows(database) == []
    # The safety backup holds what the restore overwrote, the request's write included.
    assert answer["safety_backup"].endswith("-before-restore")
    assert _rows(Path(answer["safety_backup"]) / "helpdesk.sqlite3") == [
        "written by a request in flight"]


def test_a_planted_link_is_never_taken_for_the_gate(root, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x")
    _database(root)
    backups = tmp_path / "backups"
    backups.mkdir()
    backup = tool("backup", root, backups, "r1", 5)["backup"]
    (root / "shared" / "write-gate").symlink_to(target)
    error = tool("restore", root, backup, backups, expect_ok=False)
    assert "Too many levels of symbolic links" in error and "write-gate" in error


def test_scheduled_backups_are_listed_beside_the_deploys_and_restore_by_name(root, tmp_path):
    database = _database(root)
    backups = tmp_path / "backups"
    (backups / "scheduled").mkdir(parents=True)
    deploys = tool("backup", root, backups, "r1", 5)["backup"]
    with sqlite3.connect(database) as connection:
        connection.execute("INSERT INTO t VALUES ('in the scheduled one')")
    scheduled = tool("backup", root, backups / "scheduled", "scheduled", 5)["backup"]
    assert tool("backups", backups)["backups"] == [deploys, scheduled]
    with sqlite3.connect(database) as connection:
        connection.execute("DELETE FROM t")
    answer = tool("restore", root, Path(scheduled).name, backups)
    assert answer["backup"] == scheduled
    assert _rows(database) == ["in the scheduled one"]


def _backup_with_schema(root, backups, release, columns):
    database = root / "shared" / "instance" / "helpdesk.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute(f"PRAGMA user_version = {columns}")
    return Path(tool("backup", root, backups, release, 2, 0)["backup"]).name


def test_retention_keeps_the_last_backup_before_each_schema_change(root, tmp_path):
    _database(root)
    backups = tmp_path / "backups"
    backups.mkdir()
    before_change = [_backup_with_schema(root, backups, f"a{n}", 1) for n in range(3)][-1]
    later = [_backup_with_schema(root, backups, f"b{n}", 2) for n in range(4)]
    names = sorted(os.listdir(backups))
    assert names == sorted([before_change, *later[-2:]])


def test_retention_keeps_a_backup_of_the_schema_each_kept_release_served(root, tmp_path):
    _database(root)
    release(root, "old")
    tool("switch", root, "old")
    backups = tmp_path / "backups"
    backups.mkdir()
    served_by_old = _backup_with_schema(root, backups, "x0", 1)
    release(root, "new")
    tool("switch", root, "new")
    for n in range(3):
        _backup_with_schema(root, backups, f"y{n}", 1)
    assert served_by_old in os.listdir(backups), "old is still on the server"


class Health(BaseHTTPRequestHandler):
    release = "r1"
    body = b""  # when set, the answer instead of the JSON

    def do_GET(self):
        body = Health.body or json.dumps({"status": "ok", "release": Health.release}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_health_wants_the_expected_release():
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    try:
        assert tool("health", url, "r1", 2) == {"ok": True, "release": "r1"}
        error = tool("health", url, "r2", 0.5, expect_ok=False)
        assert "it runs release r1, not r2" in error
    finally:
        server.shutdown()


def test_health_whose_release_is_the_apps_own_version_fails_at_once(monkeypatch):
    # An app's JSON health with `release: "wiki-7"` (its version) never becomes this release's
    # id: the check says so at once instead of waiting out HEALTH_TIMEOUT_S.
    import time
    monkeypatch.setattr(Health, "body", b'{"ok": true, "release": "wiki-7"}')
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        error = tool("health", f"http://127.0.0.1:{server.server_port}/-/health",
                     "943e319a2dd4", 30, expect_ok=False)
        assert time.monotonic() - started < 10
        assert "`release` is 'wiki-7', not the release id 943e319a2dd4" in error
        assert "manifest.json" in error
    finally:
        server.shutdown()


@pytest.mark.parametrize("body", [b"OK", b"pong\n", b"[1, 2]", b"1"])
def test_health_takes_a_plain_2xx_answer_that_names_no_release(monkeypatch, body):
    monkeypatch.setattr(Health, "body", body)
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/ping"
        assert tool("health", url, "r1", 2) == {"ok": True, "release": None}
    finally:
        server.shutdown()


class Redirecting(BaseHTTPRequestHandler):
    """/healthz moves to /healthz/ (a route with a trailing slash), which answers the JSON."""

    def do_GET(self):
        if self.path == "/healthz":
            self.send_response(308)
            self.send_header("Location", "/healthz/")
            self.end_headers()
            return
        body = json.dumps({"release": "r1"}).encode()
        self.send_response(200 if self.path == "/healthz/" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_health_follows_a_redirect_as_urllib_did():
    server = HTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        assert tool("health", url, "r1", 2) == {"ok": True, "release": "r1"}
    finally:
        server.shutdown()


HEALTH_IN_A_FRESH_TOOL = """
import runpy, sys
sys.argv = [sys.argv[1], "health", sys.argv[2], "r1", "2"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as leaving:
    assert not leaving.code, leaving.code
print(sorted(name for name in ("http.client", "urllib.request", "email.parser")
             if name in sys.modules))
"""


def test_a_health_check_loads_no_http_client():
    """probe, preflight, restart and verify all ask for health: importing http.client (and
    email's parser) would cost each run of the tool ~18 ms of the server's CPU."""
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        loaded = subprocess.run([sys.executable, "-I", "-S", "-c", HEALTH_IN_A_FRESH_TOOL,
                                 str(TOOL), url], capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines()[-1] == "[]"


def test_deploy_log_keeps_one_json_line_per_entry(root):
    for number in range(3):
        tool("log", root, json.dumps({"release": f"r{number}"}))
    assert [e["release"] for e in tool("history", root, 2)["entries"]] == ["r1", "r2"]
    assert "Expecting" in tool("log", root, "not json", expect_ok=False)


@pytest.mark.parametrize("planted", ["helpdesk.sqlite3-wal", "helpdesk.sqlite3-journal"])
def test_backup_and_restore_refuse_a_link_the_app_planted_in_its_folder(root, tmp_path, planted):
    database = root / "shared" / "instance" / "helpdesk.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (v TEXT)")
    backups = tmp_path / "backups"
    backups.mkdir()
    backup = tool("backup", root, backups, "r1", 2)["backup"]
    victim = tmp_path / "deploys-own-file"
    victim.write_text("echo mine\n")
    (root / "shared" / "instance" / planted).symlink_to(victim)
    assert "is a link or not a plain file" in tool("restore", root, backup, expect_ok=False)
    assert "is a link or not a plain file" in tool("backup", root, backups, "r2", 2,
                                                   expect_ok=False)
    assert victim.read_text() == "echo mine\n"


def test_a_release_marked_failed_is_no_longer_good_until_it_goes_live_again(root):
    (root / "good-releases").write_text("a\nb\n")
    tool("mark-failed", root, "b")
    state = tool("probe", root)
    assert state["good"] == ["a"] and state["failed"] == ["b"]
    tool("mark-failed", root, "b")  # twice is the same
    assert tool("probe", root)["failed"] == ["b"]
    (root / "releases" / "b").mkdir()
    tool("finish", root, "b", 5)  # forced, and it went live: good again, failed no more
    state = tool("probe", root)
    assert state["good"] == ["a", "b"] and state["failed"] == []


class Answering(BaseHTTPRequestHandler):
    status = 500

    def do_GET(self):
        self.send_response(Answering.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, timeout, words", [
    (500, 600, "answered HTTP 500; not healthy (waiting would not change it)"),
    (404, 600, "answered HTTP 404; not healthy"),
    (503, 0.5, "did not answer healthy within 0.5s: HTTP 503"),
])
def test_health_fails_at_once_on_a_final_answer_and_waits_on_a_passing_one(
        status, timeout, words):
    Answering.status = status
    server = HTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # A 600 s timeout that returned at all (the tool call has 60 s) did not wait it out.
        assert words in tool("health", f"http://127.0.0.1:{server.server_port}/healthz", "r1",
                             timeout, expect_ok=False)
    finally:
        server.shutdown()


def test_set_next_keeps_the_health_path_with_the_release_and_answers_it(root):
    for release in ("r1", "r2"):
        tool("unpack", root, make_package(root, release), release)
    assert tool("set-next", root, "r1", "", "flask --app wsgi migrate", "/ping")[
        "health_path"] == "/ping"
    assert (root / "releases" / "r1" / ".health-path").read_text() == "/ping\n"
    assert tool("set-next", root, "r1")["health_path"] == "/ping"  # a rollback to it
    assert tool("set-next", root, "r2")["health_path"] is None  # deployed before it was kept
    (root / "releases" / "r2" / ".health-path").write_text("/x; rm -rf /\n")
    assert tool("set-next", root, "r2")["health_path"] is None  # not a URL path


def test_verify_runs_every_check_in_one_call_and_answers_in_order(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    (tmp_path / "full.log").write_text("a line\n")
    (tmp_path / "empty.log").write_text("")
    spec = {"active": "no-such-unit-here", "expected": "r1", "timeout": 0.5,
            "health": [["app", url], ["wrong", url.replace("healthz", "x")]],
            "commands": [["true", ["true"], ""], ["fails", ["sh", "-c", "echo no >&2; exit 3"], ""],
                         ["full log", ["true"], str(tmp_path / "full.log")],
                         ["empty log", ["false"], str(tmp_path / "empty.log")]]}
    try:
        answers = tool("verify", json.dumps(spec))["answers"]
    finally:
        server.shutdown()
    assert answers[0][0] == "active" and answers[0][1] != "active"
    assert answers[1] == ["healthy", "r1"]
    assert answers[2][0] == "healthy"  # the fake answers every path
    assert answers[3:] == [["ran", 0, ""], ["ran", 3, "no\n"], ["ran", 0, ""],
                           ["empty", str(tmp_path / "empty.log")]]


def test_probe_says_whether_the_release_serves_now(root):
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    (root / "releases" / "r1").mkdir()
    os.symlink("releases/r1", root / "current")
    try:
        assert tool("probe", root, url, "r1")["serving"] is True
        assert tool("probe", root, url, "r2")["serving"] is False  # not current
        assert tool("probe", root)["serving"] is False  # not asked
    finally:
        server.shutdown()


@pytest.fixture()
def fake_sudo(tmp_path, monkeypatch):
    """A `sudo` that records its arguments and fails `systemctl start` when told to."""
    folder = tmp_path / "bin"
    folder.mkdir()
    record = tmp_path / "sudo.log"
    (folder / "sudo").write_text(f'#!/bin/sh\necho "$*" >> {record}\n'
                                 f'case "$*" in *"start bad"*) exit 1;; esac\n')
    (folder / "sudo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    return record


@pytest.mark.parametrize("unit, health, started, healthy", [
    ("good", "/healthz", True, True), ("good", "wrong release", True, False),
    ("bad", "/healthz", False, False)])
def test_preflight_is_stopped_whatever_happened(fake_sudo, root, unit, health, started,
                                                healthy):
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    try:
        # no such app unit running here: nothing to boot beside, so the preflight unit
        answer = tool("preflight", root, "app", unit, url,
                      "r1" if health == "/healthz" else "r2", 0.3)
    finally:
        server.shutdown()
    assert (answer["started"], answer["healthy"]) == (started, healthy)
    import time
    deadline = time.monotonic() + 5  # a healthy one is stopped in the background
    while len(fake_sudo.read_text().splitlines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_sudo.read_text().splitlines() == [
        f"-n systemctl stop {unit}", f"-n systemctl start {unit}", f"-n systemctl stop {unit}"]


def test_restart_resets_failures_restarts_and_requires_health(fake_sudo, root):
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    try:
        # no such unit running here: nothing to hand over to, so a restart
        assert tool("restart", root, "app", url, "r1", 1) == {"started": True, "healthy": True,
                                                                "how": "restarted"}
        assert tool("restart", root, "app", url, "r2", 0.3)["healthy"] is False
    finally:
        server.shutdown()
    assert fake_sudo.read_text().splitlines()[:2] == ["-n systemctl reset-failed app",
                                                     "-n systemctl restart app"]


def test_lock_also_says_whether_the_package_is_there(root):
    name = make_package(root, "r1")
    digest = __import__("hashlib").sha256((root / "packages" / name).read_bytes()).hexdigest()
    assert tool("lock", root, '{"who": "a"}', name, digest) == {"taken": True, "present": True}
    answer = tool("lock", root, '{"who": "b"}', "other.tar.gz", digest)
    assert answer["taken"] is False and answer["present"] is False
    assert answer["holder"] == {"who": "a"}


def test_prepare_runs_every_step_to_the_backup_in_one_call_and_names_a_failure(root, tmp_path):
    name = make_package(root, "r1")
    digest = __import__("hashlib").sha256((root / "packages" / name).read_bytes()).hexdigest()
    os.replace(root / "packages" / name, root / "packages" / (name + ".partial"))
    env_file = tmp_path / "app.env"
    env_file.touch(mode=0o600)
    (root / "shared" / ".env.upload-ab12").write_text("GREETING=hi\n")
    backups = tmp_path / "backups"
    from scripts.deploy.server_tool import requirements_key
    venv = root / "shared" / "venvs" / requirements_key(
        {"requirements_sha256": "r", "wheels": []}, "%d.%d" % sys.version_info[:2])
    venv.mkdir(parents=True)
    (venv / ".complete").touch()  # built before: a code-only release reuses it
    answer = tool("prepare", root, "r1", name, digest, "uploaded", env_file, ".env.upload-ab12",
                  "", "", backups, 5, 0)
    assert "failed" not in answer, answer
    assert set(answer["steps"]) == {"accept", "unpack", "venv", "shared", "next", "backup"}
    assert all(step["seconds"] >= 0 for step in answer["steps"].values())
    assert answer["steps"]["unpack"]["changed"] is True
    assert os.readlink(root / "next") == "releases/r1"
    assert env_file.read_text().startswith("GREETING=hi\n")
    assert not (root / "shared" / ".env.upload-ab12").exists()
    # With a migration to run, the backup is left to it (under the write gate).
    again = tool("prepare", root, "r1", name, digest, "", env_file, "", "", "migrate", backups,
                 5, 0)
    assert "backup" not in again["steps"] and again["steps"]["unpack"]["changed"] is False
    broken = tool("prepare", root, "r2", name, digest, "", env_file, "", "", "", backups, 5, 0)
    assert broken["failed"] == "unpack" and broken["steps"] == {}
    assert "does not hold release r2" in broken["error"]


def serve_calls(*calls):
    """The answers of one `serve` process to CALLS (argv lists), in order, and its exit
    status once its input ended."""
    process = subprocess.Popen([sys.executable, "-I", "-S", str(TOOL), "serve"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(process.stdout.readline()) == {"serving": True}
    answers = []
    for argv in calls:
        process.stdin.write(json.dumps([str(word) for word in argv]) + "\n")
        process.stdin.flush()
        answers.append(json.loads(process.stdout.readline()))
    process.stdin.close()
    assert process.wait(timeout=30) == 0
    return answers


def test_serve_answers_each_call_in_order_as_its_own_call_would(root):
    name = make_package(root, "r1")
    unpacked, again, refused, probed = serve_calls(
        ["unpack", root, name, "r1"], ["unpack", root, name, "r1"],
        ["switch", root, "../x"], ["probe", root])
    assert (unpacked["status"], json.loads(unpacked["stdout"])["changed"]) == (0, True)
    assert json.loads(again["stdout"])["changed"] is False
    assert refused["status"] == 2 and refused["stderr"].startswith("error: ")
    assert "is not a release name" in refused["stderr"]
    assert probed["status"] == 0 and json.loads(probed["stdout"])["releases"] == ["r1"]


def test_serve_passes_every_argument_and_refuses_a_nested_serve(root):
    """An argument that happens to read `serve` (a release named so) is an argument."""
    name = make_package(root, "serve")
    unpacked, nested = serve_calls(["unpack", root, name, "serve"], ["serve"])
    assert unpacked["status"] == 0, unpacked["stderr"]
    assert (root / "releases" / "serve" / "wsgi.py").exists()
    assert nested["status"] == 2 and "unknown command" in nested["stderr"]


def test_serve_keeps_what_child_processes_print_off_its_channel(root):
    """A child inherits the process's stdout and stderr: they must not be the channel (its
    words would be taken for an answer). Here `python -m venv` fails and says why."""
    release(root, "r1")
    (root / "shared" / "venvs").rmdir()
    (root / "shared" / "venvs").write_text("a file where the venvs folder should be")
    failed, probed = serve_calls(["venv", root, "r1"], ["probe", root])
    assert failed["status"] == 2 and "CalledProcessError" in failed["stderr"]
    assert "Error" in failed["stderr"].split("error: ")[0]  # the child's own words, kept
    assert probed["status"] == 0 and json.loads(probed["stdout"]).get("releases") == ["r1"]


def test_serve_keeps_nothing_open_that_a_refused_call_opened(root, tmp_path):
    """A restore refused over the app's hot journal had opened the live database and the
    backup; its own process would have ended and closed them. A serve process lives on for
    the rest of the run: it must not keep the app's database files open."""
    database = root / "shared" / "instance" / "helpdesk.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (v TEXT)")
    backups = tmp_path / "backups"
    backups.mkdir()
    crash = ("import os, sqlite3\nc = sqlite3.connect(%r)\nc.execute('PRAGMA cache_size=1')\n"
             "c.execute('BEGIN')\nc.execute(\"INSERT INTO t SELECT hex(randomblob(4000)) FROM "
             "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<300) "
             "SELECT i FROM n)\")\nos._exit(0)\n" % str(database))
    process = subprocess.Popen([sys.executable, "-I", "-S", str(TOOL), "serve"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(*argv):
        process.stdin.write(json.dumps([str(word) for word in argv]) + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())
    try:
        process.stdout.readline()
        backup = json.loads(call("backup", root, backups, "r1", 2)["stdout"])["backup"]
        subprocess.run([sys.executable, "-c", crash], check=True)  # the app died mid-write
        assert (root / "shared" / "instance" / "helpdesk.sqlite3-journal").exists()
        refused = call("restore", root, backup)
        assert refused["status"] == 2 and "journal to roll back" in refused["stderr"]
        fd_dir = Path(f"/proc/{process.pid}/fd")
        opened = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
        assert [name for name in opened if str(tmp_path) in name] == []
    finally:
        process.stdin.close()
        process.wait(timeout=30)
