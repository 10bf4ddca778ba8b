"""The provisioning stamp against the local script, templates and settings: one line that says
whether the server is current, and what is behind when it is not."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from scripts.provision import setup_flags
from scripts.settings import load_settings
from scripts.setup_stamp import compare, expected_settings, local_version, next_step, parse

WHERE = PurePosixPath("/etc/flask-helpdesk/server-setup.stamp")


def settings(**values):
    return load_settings(Path("/nonexistent"), environ={"DEPLOY_SERVER": "web-1.example.com",
                                                       **values})


def stamp_as_the_script_writes_it(**changes: str) -> dict[str, str]:
    """What server_setup.sh with the guide's defaults writes (see stamp_text there)."""
    version = local_version()
    text = (f"# written by server_setup.sh\nscript={version['script']}\n"
            f"templates={version['templates']}\nssh_hardening=applied\nDEPLOY_USER=deploy\n"
            "APP_USER=www-data\nDEPLOY_PATH=/var/www/flask_helpdesk\n"
            "BACKUP_PATH=/var/backups/flask_helpdesk\nLOG_PATH=/var/log/flask_helpdesk\n"
            "SERVICE_NAME=flask-helpdesk\nAPP_PORT=5000\nPREFLIGHT_PORT=5001\nSSH_PORT=22\n"
            "SERVER_NAME=_\nSITE_NAME=flask_helpdesk\nWORKERS=2\nBACKUP_SCHEDULE=daily\n"
            "BACKUPS_KEEP=10\nBACKUPS_KEEP_DAYS=7\n")
    return {**parse(text), **changes}


def verdict(stamp, **values):
    flags = setup_flags(settings(**values), "ssh-ed25519 AAAA key", 2222)
    return compare(stamp, expected_settings(flags), local_version(), WHERE)


def test_a_server_set_up_by_hand_with_the_defaults_is_current_whatever_port_ssh_uses():
    result = verdict(stamp_as_the_script_writes_it())
    assert result.current and result.text.startswith("provisioned by this server_setup.sh")


def test_each_way_to_be_behind_is_named_in_one_line():
    cases = [(None, "no provisioning stamp (/etc/flask-helpdesk/server-setup.stamp)", {}),
             (stamp_as_the_script_writes_it(script="0" * 64), "by another server_setup.sh", {}),
             (stamp_as_the_script_writes_it(templates="1" * 64), "with other templates", {}),
             (stamp_as_the_script_writes_it(), "with WORKERS=2, the settings say 4",
              {"GUNICORN_WORKERS": "4"}),
             (stamp_as_the_script_writes_it(ssh_hardening="waiting"), "hardening still waits",
              {})]
    for stamp, words, values in cases:
        result = verdict(stamp, **values)
        assert not result.current and words in result.text and "\n" not in result.text
        assert result.stamped == (stamp is not None)


def test_the_stamp_holds_no_key_and_no_secret_to_compare():
    flags = setup_flags(settings(), "ssh-ed25519 AAAA key", 22)
    assert "DEPLOY_KEY" not in expected_settings(flags)
    assert expected_settings(flags)["DEPLOY_PATH"] == "/var/www/flask_helpdesk"


def test_deploy_sets_up_only_with_a_usable_setup_user_and_stops_only_on_a_bare_server():
    behind = verdict(stamp_as_the_script_writes_it(templates="1" * 64))
    never = verdict(None)
    assert next_step(verdict(stamp_as_the_script_writes_it()), False, "no") == "ok"
    assert next_step(behind, True, "") == next_step(never, False, "") == "setup"
    assert next_step(None, False, "") == "setup"  # no deploy user yet, and admin can set it up
    assert next_step(behind, True, "SETUP_USER is not set") == "warn"
    assert next_step(never, True, "root: refused") == "warn"  # provisioned before stamps
    assert next_step(never, False, "SETUP_USER is not set") == "stop"
    assert next_step(None, False, "SETUP_USER is not set") == "stop"
