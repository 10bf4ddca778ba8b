"""`doit setup` logs in as SETUP_USER with that account's own key, never the deploy key, and
its error lines never advise giving the provisioning account the deploy key."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.errors import ToolkitError
from scripts.remote import explain_ssh_failure
from scripts.settings import load_settings
from scripts.targets import deploy_targets, setup_targets


def settings_with(tmp_path, **values):
    return load_settings(tmp_path / "missing.env", environ={"DEPLOY_SERVER": "web-1.example.com",
                                                            **values})


def test_setup_logs_in_with_its_own_key_and_deploys_with_the_deploy_key(tmp_path):
    settings = settings_with(tmp_path, SSH_KEY_FILE="/keys/deploy", SETUP_KEY_FILE="/keys/admin")
    (setup,) = setup_targets(settings)
    (deploy,) = deploy_targets(settings)
    assert (setup.user, setup.key_file, setup.key_setting) == ("root", Path("/keys/admin"),
                                                               "SETUP_KEY_FILE")
    assert (deploy.user, deploy.key_file) == ("deploy", Path("/keys/deploy"))


def test_without_setup_key_file_setup_uses_ssh_agent_not_the_deploy_key(tmp_path):
    settings = settings_with(tmp_path, SSH_KEY_FILE="/keys/deploy")
    (setup,) = setup_targets(settings)
    assert setup.key_file is None


def test_the_deploy_key_as_setup_key_is_refused(tmp_path):
    settings = settings_with(tmp_path, SSH_KEY_FILE="/keys/deploy", SETUP_KEY_FILE="/keys/deploy")
    with pytest.raises(ToolkitError, match=r"^setting SETUP_KEY_FILE is the deploy key"):
        setup_targets(settings)


def test_a_refused_setup_key_is_explained_without_advising_the_deploy_key(tmp_path):
    settings = settings_with(tmp_path, SETUP_KEY_FILE="/keys/admin")
    (setup,) = setup_targets(settings)
    line = explain_ssh_failure(setup, "root@web-1.example.com: Permission denied (publickey).")
    assert "set SETUP_KEY_FILE to root's own key" in line
    assert "authorized_keys" not in line and "Never give root the deploy key" in line


def test_sudo_asking_for_or_refusing_the_password_is_one_line_that_never_holds_it():
    from scripts.provision import _raise_on_failure
    from scripts.remote import Target

    olga = Target("web-1.example.com", 22, "olga", name="web-1.example.com")
    with pytest.raises(ToolkitError, match=r"sudo asks olga for a password; set "
                                           r"SETUP_SUDO_PASSWORD, or give olga NOPASSWD sudo$"):
        _raise_on_failure(1, ["sudo: a password is required"], olga)
    with pytest.raises(ToolkitError, match=r"sudo refused SETUP_SUDO_PASSWORD for olga"):
        _raise_on_failure(1, ["Sorry, try again.", "sudo: no password was provided",
                              "sudo: 1 incorrect password attempt"], olga)


def test_a_sudo_password_of_two_lines_is_refused_without_showing_it(tmp_path):
    with pytest.raises(ToolkitError) as error:
        settings_with(tmp_path, SETUP_SUDO_PASSWORD="first\nsecond")
    assert "SETUP_SUDO_PASSWORD" in str(error.value) and "first" not in str(error.value)
    assert "second" not in repr(settings_with(tmp_path, SETUP_SUDO_PASSWORD="second"))
