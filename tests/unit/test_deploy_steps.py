"""The deploy and rollback step order, with a recording fake server (no SSH): what runs, in
which order, and what happens when a step fails. Real servers: tests/integration."""

from __future__ import annotations

import json

from pathlib import Path, PurePosixPath

import pytest

from scripts.build.package import BuildRecord
from scripts.deploy import commands
from scripts.deploy.deploy import deploy_to_server
from scripts.deploy.report import Reporter
from scripts.deploy.rollback import rollback_server
from scripts.deploy.server import Result
from scripts.errors import ToolkitError
from scripts.provision import setup_argv, setup_flags
from scripts.remote import Target
from scripts.settings import load_settings

SETTINGS = load_settings(Path("/nonexistent"), environ={})


class FakeServer:
    """Records every command; answers the server tool from a table; fails what it is told to."""

    def __init__(self, answers=None, failing=()):
        self.name = "fake"
        self.dry_run = False
        self.deploy_path = PurePosixPath("/var/www/flask_helpdesk")
        self.target = Target("fake", 22, "deploy")
        self.calls: list[str] = []
        self.tool_args: list[tuple] = []
        self.answers = {"probe": {"current": "old", "good": ["old"], "layout": True},
                        "lock": {"taken": True}, "unlock": {"released": True},
                        "has-package": {"present": False}, "unpack": {"changed": True},
                        "venv": {"changed": False, "venv": "abc"}, "link-shared": {},
                        "backup": {"backup": "/var/backups/flask_helpdesk/b1"},
                        "migrate-held": {"backup": "/var/backups/flask_helpdesk/b1",
                                         "migrated": True, "held_s": 0.7, "backup_s": 0.1},
                        "switch": {"changed": True, "previous": "old"},
                        "previous-good": {"current": "new", "previous": "old"},
                        "preflight": {"started": True, "healthy": True},
                        "restart": {"started": True, "healthy": True},
                        **(answers or {})}
        self.failing = failing

    def ensure_tool(self):
        return True

    def tool_call(self, subcommand, *args, what="", reads=None):
        if subcommand == "prepare":
            self.tool_args.append((subcommand, *args))
            return self.prepare(migrate_command=args[8])
        self.calls.append(f"tool {subcommand}")
        self.tool_args.append((subcommand, *args))
        if subcommand in self.failing:
            raise ToolkitError(f"{subcommand} failed")
        return self.answers.get(subcommand, {})

    def prepare(self, migrate_command):
        """The server's one call from unpack to the backup, as the steps it runs."""
        self.calls.append("tool prepare")
        steps = {}
        for name, subcommand in (("unpack", "unpack"), ("venv", "venv"),
                                 ("shared", "link-shared"), ("next", "set-next")):
            self.calls.append(f"tool {subcommand}")
            if subcommand in self.failing:
                return {"steps": steps, "failed": name, "error": f"{subcommand} failed"}
            steps[name] = self.answers.get(subcommand, {})
        if not migrate_command or steps["next"].get("migrations_unchanged"):
            self.calls.append("tool backup")
            steps["backup"] = self.answers["backup"]
        return {"steps": steps}

    def run(self, argv, check=True, what="", reads=False):
        self.calls.append(" ".join(map(str, argv)))
        failed = any(" ".join(argv).endswith(f) for f in self.failing)
        if failed and check:
            raise ToolkitError(f"{argv} failed")
        return Result(1 if failed else 0, "active\n", "")

    def sudo(self, argv, check=True, what="", reads=False):
        return self.run(["sudo", *argv], check=check, what=what)

    def put(self, data, path):
        self.calls.append(f"put {path}")


RECORD = BuildRecord("helpdesk", "new", "helpdesk-new.tar.gz", "0" * 64, 10, 1, "", "")


@pytest.fixture()
def package(tmp_path):
    path = tmp_path / "helpdesk-new.tar.gz"
    path.write_bytes(b"package")
    return path


def order_of(calls, *markers):
    return [next(i for i, call in enumerate(calls) if marker in call) for marker in markers]


def test_a_deploy_runs_its_steps_in_order_and_releases_the_lock(package):
    server = FakeServer()
    deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    positions = order_of(server.calls, "tool lock", "put ", "tool unpack", "tool venv",
                         "tool set-next", "tool migrate-held",
                         "tool preflight", "tool switch",
                         "tool restart", "tool finish", "tool log", "tool unlock")
    assert positions == sorted(positions)


def test_the_same_release_current_but_not_serving_is_deployed_again(package):
    server = FakeServer({"probe": {"current": "new", "good": ["new"], "layout": True,
                                   "serving": False}})
    deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert "tool lock" in server.calls and "tool restart" in server.calls


def test_the_same_release_already_serving_does_nothing(package):
    server = FakeServer({"probe": {"current": "new", "good": ["new"], "layout": True,
                                   "serving": True}})
    outcome = deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert not outcome.changed
    assert "tool lock" not in server.calls


def test_a_failed_migration_says_its_exact_backup_was_restored_and_never_switches(package):
    server = FakeServer({"migrate-held": {"backup": "/var/backups/flask_helpdesk/b1",
                                          "migrated": False, "restored": ["helpdesk.sqlite3"]}})
    with pytest.raises(ToolkitError, match="restored exactly as it was from /var/backups/"
                                           "flask_helpdesk/b1: no acknowledged write was lost"):
        deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert "tool switch" not in server.calls
    assert server.calls[-1] == "tool unlock"


def test_a_failed_migration_names_the_setting_that_holds_the_command(package):
    server = FakeServer({"migrate-held": {"backup": None, "migrated": False}})
    with pytest.raises(ToolkitError) as error:
        deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert "setting MIGRATE_COMMAND='flask --app wsgi migrate'" in str(error.value)


def test_the_migration_runs_under_the_write_gate_and_the_output_says_how_long(package):
    lines = []
    deploy_to_server(FakeServer(), SETTINGS, RECORD, package, Reporter(log=lines.append))
    assert any(line.startswith("changed  backup      0.10 s  /var/backups/flask_helpdesk/b1")
               for line in lines), lines
    assert any(line.startswith("changed  migrate     0.60 s") and "requests held 0.70 s" in line
               for line in lines), lines


def test_unchanged_migrations_are_skipped_and_said_so(package):
    settings = load_settings(Path("/nonexistent"), environ={"MIGRATIONS_PATHS": "helpdesk/db.py"})
    server = FakeServer({"set-next": {"migrations_unchanged": True, "current": "old"}})
    lines = []
    deploy_to_server(server, settings, RECORD, package, Reporter(log=lines.append))
    assert "tool set-next" in server.calls and "tool backup" in server.calls
    assert "tool migrate-held" not in server.calls
    assert any(line.startswith("ok       migrate") and
               "skipped: helpdesk/db.py unchanged since old, and so is MIGRATE_COMMAND "
               "(MIGRATIONS_PATHS)" in line for line in lines), lines


@pytest.mark.parametrize("answer, why", [
    ({"current": None, "migrations_changed": []}, "no other live release to compare with"),
    ({"current": "old", "migrations_changed": ["helpdesk/db.py"]},
     "helpdesk/db.py changed since old"),
    ({"current": "old", "migrations_changed": [], "command_changed": True},
     "MIGRATE_COMMAND changed since old"),
    ({"current": "old", "migrations_changed": ["helpdesk/db.py"], "command_changed": True},
     "helpdesk/db.py changed and MIGRATE_COMMAND changed since old"),
])
def test_the_migrate_step_says_why_the_migrations_run(package, answer, why):
    settings = load_settings(Path("/nonexistent"), environ={"MIGRATIONS_PATHS": "helpdesk/db.py"})
    server = FakeServer({"set-next": {"migrations_unchanged": False, **answer}})
    lines = []
    deploy_to_server(server, settings, RECORD, package, Reporter(log=lines.append))
    assert any(line.startswith("changed  migrate") and
               f"flask --app wsgi migrate ({why}; requests held" in line for line in lines), lines
    always = load_settings(Path("/nonexistent"), environ={"MIGRATIONS_PATHS": ""})
    lines.clear()
    deploy_to_server(FakeServer(), always, RECORD, package, Reporter(log=lines.append))
    assert any("(MIGRATIONS_PATHS is empty: always; requests held" in line
               for line in lines), lines


def test_a_failed_restart_switches_back_to_the_previous_release(package):
    server = FakeServer({"restart": {"started": False, "error": "Job failed"}})
    with pytest.raises(ToolkitError, match="restarting the service failed: Job failed; "
                                           "switched back: release old serves again"):
        deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert server.calls.count("tool switch") == 2
    assert "tool finish" not in server.calls
    assert "tool unlock" in server.calls


def test_an_unhealthy_preflight_never_switches(package):
    server = FakeServer({"preflight": {"started": True, "healthy": False, "error": "HTTP 503"}})
    with pytest.raises(ToolkitError, match="HTTP 503 .*the old release keeps serving"):
        deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert "tool switch" not in server.calls


def test_rollback_with_nothing_before_says_so():
    server = FakeServer({"previous-good": {"current": "only", "previous": None}})
    with pytest.raises(ToolkitError, match="nothing to roll back to"):
        rollback_server(server, SETTINGS, Reporter(log=lambda *_: None))
    assert "tool lock" not in server.calls


def test_rollback_to_an_unproven_release_runs_its_preflight_first():
    server = FakeServer()
    server.answers["previous-good"] = {"current": "new", "previous": "never-live"}
    rollback_server(server, SETTINGS, Reporter(log=lambda *_: None))
    positions = order_of(server.calls, "tool lock", "tool preflight",
                         "tool switch", "tool restart", "tool unlock")
    assert positions == sorted(positions)  # the restart checks health again
    assert "tool restore" not in server.calls and "tool backup" not in server.calls


def test_rollback_to_a_good_release_is_gated_by_its_health_after_the_restart():
    server = FakeServer()
    rollback_server(server, SETTINGS, Reporter(log=lambda *_: None))
    assert not any("preflight" in call for call in server.calls)
    positions = order_of(server.calls, "tool switch", "tool restart")
    assert positions == sorted(positions)  # the restart's call requires its health


def test_a_rollback_checks_the_health_path_the_old_release_was_deployed_with():
    server = FakeServer({"set-next": {"health_path": "/ping"}})
    rollback_server(server, SETTINGS, Reporter(log=lambda *_: None))
    urls = [args[3] for args in server.tool_args if args[0] == "restart"]
    assert urls and all(url.endswith(":5000/ping") for url in urls), urls
    before = FakeServer({"set-next": {"health_path": None}})  # deployed before it was kept
    rollback_server(before, SETTINGS, Reporter(log=lambda *_: None))
    assert [args[3] for args in before.tool_args if args[0] == "restart"][-1].endswith("/healthz")


def test_a_deploy_keeps_its_health_path_with_the_release(package):
    server = FakeServer()
    deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    (prepare,) = [args for args in server.tool_args if args[0] == "prepare"]
    assert prepare[-1] == "/healthz"  # the server tool's set-next keeps it with the release


def test_a_restore_is_recorded_as_restore_and_a_rollback_warns_on_stderr(capsys):
    from dataclasses import replace
    restore = FakeServer({"restore": {"restored": ["helpdesk.sqlite3"]}, "backups": {
        "backups": ["/var/backups/flask_helpdesk/20260101T000000000000Z-old"]}})
    lines = []
    rollback_server(restore, replace(SETTINGS, restore_backup="20260101T000000000000Z-old"),
                    Reporter(log=lines.append), stay_on_current=True)
    logged = [json.loads(args[2]) for args in restore.tool_args if args[0] == "log"]
    locked = [json.loads(args[2]) for args in restore.tool_args if args[0] == "lock"]
    assert [entry["action"] for entry in logged + locked] == ["restore", "restore"]
    rollback = FakeServer()
    rollback_server(rollback, replace(SETTINGS, restore_backup="20260101T000000000000Z-old"),
                    Reporter(log=lines.append))
    assert [json.loads(args[2] if args[0] == "log" else args[4])["action"]
            for args in rollback.tool_args if args[0] in ("log", "rolled-back")] == ["rollback"]
    assert not any("RESTORE_BACKUP" in line for line in lines)
    assert "warning: RESTORE_BACKUP=20260101T000000000000Z-old is set, but a rollback never " \
        "restores" in capsys.readouterr().err


def test_a_restore_of_a_backup_not_on_the_server_locks_and_logs_nothing():
    from dataclasses import replace
    server = FakeServer({"backups": {"backups": ["/var/backups/flask_helpdesk/b1"]}})
    with pytest.raises(ToolkitError, match=r"^fake: RESTORE_BACKUP=b2 is not a backup on this "
                                           r"server; `doit backups` lists them \(the newest: b1\)$"):
        rollback_server(server, replace(SETTINGS, restore_backup="b2"),
                        Reporter(log=lambda *_: None), stay_on_current=True)
    assert not {"lock", "log", "set-next", "restore"} & {args[0] for args in server.tool_args}


def test_a_rollback_target_failing_its_health_check_is_switched_back():
    server = FakeServer({"restart": {"started": True, "healthy": False, "error": "HTTP 500"}})
    with pytest.raises(ToolkitError):
        rollback_server(server, SETTINGS, Reporter(log=lambda *_: None))
    assert server.calls.count("tool switch") == 2


def test_command_builders():
    assert commands.systemctl("restart", "flask-helpdesk") == ["systemctl", "restart",
                                                               "flask-helpdesk"]
    assert commands.journal("x", 30) == ["journalctl", "-u", "x", "--no-pager", "-n", "30"]
    assert commands.health_url(5001, "/healthz") == "http://127.0.0.1:5001/healthz"
    assert commands.preflight_port(SETTINGS) == 5001
    assert commands.units(SETTINGS) == {"app": "flask-helpdesk",
                                        "migrate": "flask-helpdesk-migrate",
                                        "preflight": "flask-helpdesk-preflight"}


def test_setup_flags_carry_every_setting_and_root_needs_allow_root():
    flags = setup_flags(SETTINGS, "ssh-ed25519 AAAA key", 22)
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--deploy-path"] == "/var/www/flask_helpdesk"
    assert pairs["--service-name"] == "flask-helpdesk"
    assert pairs["--deploy-key"] == "ssh-ed25519 AAAA key"
    as_root = setup_argv("/tmp/x", flags, "root", verified=False)
    assert as_root[:2] == ["bash", "/tmp/x/server_setup.sh"] and as_root[-1] == "--allow-root"
    assert "--conf-dir" not in as_root  # the script goes alone, its templates inside it
    assert setup_argv("/tmp/x", flags, "root", False, check=True)[-1] == "--check"


def test_a_non_root_setup_user_runs_the_script_through_sudo_never_with_the_password_in_argv():
    flags = setup_flags(SETTINGS, "ssh-ed25519 AAAA key", 22)
    nopasswd = setup_argv("/tmp/x", flags, "admin", verified=True)
    assert nopasswd[:4] == ["sudo", "-n", "--", "bash"] and "--allow-root" not in nopasswd
    assert nopasswd[-1] == "--deploy-key-verified"
    with_password = setup_argv("/tmp/x", flags, "admin", False, sudo_password=True)
    assert with_password[:5] == ["sudo", "-S", "-p", "", "--"]  # no prompt text; stdin only


def test_a_lock_released_while_python_exits_warns_instead_of_reconnecting(monkeypatch):
    # A new connection needs a thread, and no thread starts while Python exits: it would hang.
    from scripts.deploy import lock

    class DeadServer(FakeServer):
        def reconnect(self):
            self.calls.append("reconnect")

    server = DeadServer(failing=("unlock",))
    lines = []
    monkeypatch.setattr(lock.sys, "is_finalizing", lambda: True)
    lock.release_lock(server, "token", log=lines.append)
    assert "reconnect" not in server.calls
    assert lines == ["fake: warning: could not release the deploy lock (unlock failed); run "
                     "`doit unlock`"]
    monkeypatch.setattr(lock.sys, "is_finalizing", lambda: False)
    lock.release_lock(server, "token", log=lines.append)
    assert "reconnect" in server.calls  # a cut connection, otherwise, gets one more try


def test_a_failed_units_journal_is_explained_by_its_exception_file_and_line():
    from scripts.deploy.deploy import explain_failure
    journal = [
        "Nov 29 08:00:01 web gunicorn[11]: Traceback (most recent call last):",
        'Nov 29 08:00:01 web gunicorn[11]:   File "/var/www/flask_helpdesk/next/.venv/lib/'
        'python3.11/site-packages/flask/cli.py", line 245, in locate_app',
        'Nov 29 08:00:01 web gunicorn[11]:   File "/var/www/flask_helpdesk/releases/abc/'
        'helpdesk/views.py", line 3, in <module>',
        "Nov 29 08:00:01 web gunicorn[11]:     import markdown",
        "Nov 29 08:00:01 web gunicorn[11]: ModuleNotFoundError: No module named 'markdown'",
        "Nov 29 08:00:01 web gunicorn[11]: Usage: flask [OPTIONS] COMMAND [ARGS]...",
        "Nov 29 08:00:01 web gunicorn[11]: Error: No such command 'migrate'.",
    ]
    assert explain_failure(journal) == ("ModuleNotFoundError: No module named 'markdown' (in "
                                        "helpdesk/views.py, line 3); is the package in the "
                                        "app's requirements.txt?")
    assert explain_failure(["Nov 29 x[1]: plain failure"]) == "plain failure"


def test_a_failed_units_journal_is_explained_by_its_last_run_only():
    # The unit's journal holds the earlier runs too: a deploy that failed on a missing module,
    # then one whose app has no `migrate` command. The second is not explained by the first.
    from scripts.deploy.deploy import explain_failure
    journal = [
        "Nov 29 11:46:55 web systemd[1]: Starting app-migrate.service - app: migrations...",
        "Nov 29 11:46:55 web sh[7]: ModuleNotFoundError: No module named 'yaml'",
        "Nov 29 11:46:55 web systemd[1]: Failed to start app-migrate.service - app: migrations.",
        "Nov 29 11:57:34 web systemd[1]: Starting app-migrate.service - app: migrations...",
        "Nov 29 11:57:34 web sh[9]: Usage: flask [OPTIONS] COMMAND [ARGS]...",
        "Nov 29 11:57:34 web sh[9]: Error: No such command 'migrate'.",
        "Nov 29 11:57:34 web systemd[1]: app-migrate.service: Failed with result 'exit-code'.",
    ]
    assert explain_failure(journal) == "Error: No such command 'migrate'."


def test_release_is_taken_as_a_unique_prefix_and_a_wrong_one_lists_the_releases():
    from scripts.deploy.rollback import resolve_release
    state = {"releases": ["f492aa000001", "f4b100000002", "0c0c00000003"],
             "good": ["0c0c00000003", "f492aa000001"]}
    assert resolve_release("web", "f492", state) == "f492aa000001"
    assert resolve_release("web", "0c0c00000003", state) == "0c0c00000003"
    with pytest.raises(ToolkitError, match=r"matches 2 releases .*give more"):
        resolve_release("web", "f4", state)
    with pytest.raises(ToolkitError, match=r"RELEASE=beef is not on this server \(as an id or "
                       r"the start of one\); releases there \(good, newest first\): "
                       r"f492aa000001, 0c0c00000003; others \(rolled back from or failed\): "
                       r"f4b100000002$"):
        resolve_release("web", "beef", state)


class SwitchingServer(FakeServer):
    """A fake that remembers where `current` points, and is interrupted at one command."""

    def __init__(self, interrupt_at):
        super().__init__()
        self.current = "old"
        self.interrupt_at = interrupt_at

    def reconnect(self):
        self.calls.append("reconnect")

    def tool_call(self, subcommand, *args, what="", reads=None):
        if f"tool {subcommand}" == self.interrupt_at:
            self.interrupt_at = ""
            self.calls.append(f"tool {subcommand}")
            raise KeyboardInterrupt
        answer = super().tool_call(subcommand, *args, what=what)
        if subcommand == "switch":
            answer = {"changed": True, "previous": self.current}
            self.current = args[1]
        if subcommand == "probe":
            answer = {**answer, "current": self.current}
        return answer

    def run(self, argv, check=True, what=""):
        if " ".join(argv).endswith(self.interrupt_at) and self.interrupt_at:
            self.interrupt_at = ""
            self.calls.append(" ".join(argv))
            raise KeyboardInterrupt
        return super().run(argv, check, what)


def test_an_interrupt_between_switch_and_restart_switches_back(package):
    server = SwitchingServer(interrupt_at="tool restart")
    with pytest.raises(KeyboardInterrupt):
        deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert server.current == "old"
    after = server.calls[server.calls.index("reconnect"):]
    # back on the old release: the tool wakes its parked master, or restarts the service
    assert after.index("tool switch") < after.index("tool restart")
    assert server.calls[-1] == "tool unlock"


def test_an_interrupt_before_the_switch_switches_nothing(package):
    server = SwitchingServer(interrupt_at="tool preflight")
    with pytest.raises(KeyboardInterrupt):
        deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lambda *_: None))
    assert "tool switch" not in server.calls


def test_a_dry_run_prints_the_held_migration_and_runs_nothing(tmp_path):
    import io
    import tarfile
    package = tmp_path / "helpdesk-new.tar.gz"
    manifest = json.dumps({"requirements_sha256": "0" * 64, "wheels": []}).encode()
    with tarfile.open(package, "w:gz") as tar:
        entry = tarfile.TarInfo("manifest.json")
        entry.size = len(manifest)
        tar.addfile(entry, io.BytesIO(manifest))
    server = FakeServer({"migrate-held": {}, "probe": {"python": "3.11"},
                         "plan": {"unpacked": False, "venv_ready": True,
                                  "databases": ["helpdesk.sqlite3"], "env_sha256": "e"}})
    server.dry_run = True
    lines = []
    deploy_to_server(server, SETTINGS, RECORD, package, Reporter(log=lines.append))
    assert "tool migrate-held" in server.calls
    assert any(" migrate " in line for line in lines)
    assert any(" backup " in line and "(helpdesk.sqlite3)" in line for line in lines)
