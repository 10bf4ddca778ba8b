"""DEPLOY_SERVER entries that name a `Host` of the user's SSH configuration, resolved by the real
OpenSSH client (`ssh -G`): what the configuration says applies where no setting was given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scripts import remote
from scripts.errors import ToolkitError
from scripts.settings import load_settings
from scripts.ssh_config import config_file
from scripts.targets import deploy_public_key, deploy_targets, setup_targets
from tests.unit.test_remote import closed_port

CONFIG = """
Host ceoa
  HostName 127.0.0.1
  Port 2236
  User alice
  IdentityFile {key}
  UserKnownHostsFile {known_hosts}
Host nouser
  HostName 127.0.0.2
Host inner
  HostName 192.0.2.2
  ProxyJump bastion
Host bastion
  HostName 127.0.0.1
  Port {closed}
  StrictHostKeyChecking no
  BatchMode no
Host refused
  HostName 127.0.0.1
  Port {closed}
  IdentityFile {key}
"""


@pytest.fixture()
def ssh_config(tmp_path) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(CONFIG.format(key=tmp_path / "id_test", known_hosts=tmp_path / "kh",
                                  closed=closed_port()))
    return path


def targets(ssh_config: Path, **settings: str):
    return deploy_targets(load_settings(Path("/nonexistent"),
                                        environ={"SSH_CONFIG": str(ssh_config), **settings}))


def connection_error(ssh_config: Path, entry: str) -> tuple[str, remote.Target]:
    """The one line a failed connection to `entry` stops with, and its target."""
    [target] = targets(ssh_config, DEPLOY_SERVER=entry)
    with pytest.raises(ToolkitError) as raised:
        remote.open_session(target)
    return str(raised.value), target


def ssh_g(config: Path, host: str) -> dict[str, str]:
    """What ssh will use for a host with this -F file (the toolkit's connections use it)."""
    output = subprocess.run(["ssh", "-F", str(config), "-G", host], capture_output=True,
                            text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in reversed(output.splitlines()))


def test_an_alias_takes_address_port_and_user_from_the_configuration(ssh_config):
    [target] = targets(ssh_config, DEPLOY_SERVER="ceoa")
    assert (target.host, target.address, target.port, target.user) == \
        ("ceoa", "127.0.0.1", 2236, "alice")
    assert target.display == "ceoa"
    assert target.label() == "ceoa (alice@127.0.0.1:2236)"
    assert target.key_file is None and target.known_hosts_file is None  # ssh reads them itself


def test_settings_the_user_gave_win_over_the_configuration_and_defaults_do_not(ssh_config):
    given = targets(ssh_config, DEPLOY_SERVER="ceoa", DEPLOY_USER="bob", SSH_PORT="22")[0]
    assert (given.port, given.user) == (22, "bob")
    entry = targets(ssh_config, DEPLOY_SERVER="carol@ceoa:2400", DEPLOY_USER="bob")[0]
    assert (entry.port, entry.user, entry.display) == (2400, "carol", "ceoa:2400")
    # The configuration names no User: the toolkit's default deploy user, not the local user.
    nouser = targets(ssh_config, DEPLOY_SERVER="nouser")[0]
    assert (nouser.address, nouser.port, nouser.user) == ("127.0.0.2", 22, "deploy")


def test_a_user_of_a_catch_all_entry_is_not_the_deploy_user(ssh_config):
    ssh_config.write_text(ssh_config.read_text() + "Host *\n  User olga\n  Port 2201\n")
    ceoa, nouser, address = (targets(ssh_config, DEPLOY_SERVER=entry)[0]
                             for entry in ("ceoa", "nouser", "10.1.2.3"))
    assert (ceoa.user, nouser.user, address.user) == ("alice", "deploy", "deploy")
    assert (nouser.port, address.port) == (2201, 2201)  # where plain ssh would connect


def test_setup_logs_in_as_the_setup_user_at_the_configured_address(ssh_config):
    settings = load_settings(Path("/nonexistent"), environ={"SSH_CONFIG": str(ssh_config),
                                                            "DEPLOY_SERVER": "alice@ceoa"})
    [target] = setup_targets(settings)
    assert (target.host, target.address, target.port, target.user) == \
        ("ceoa", "127.0.0.1", 2236, "root")


def test_a_plain_address_behaves_as_before(ssh_config):
    [target] = targets(ssh_config, DEPLOY_SERVER="10.1.2.3")
    assert (target.address, target.port, target.user) == ("10.1.2.3", 22, "deploy")
    assert target.label() == "deploy@10.1.2.3:22"


def test_the_toolkit_rules_bind_every_hop_and_its_default_user_only_the_target(ssh_config):
    [target] = targets(ssh_config, DEPLOY_SERVER="inner")
    assert target.jump == "bastion"
    assert target.label() == "inner (deploy@192.0.2.2:22 via bastion)"
    connection_config = Path(remote.ssh_options(target)[1])
    # ssh hands this -F file on to the ssh that ProxyJump starts for the bastion.
    bastion = ssh_g(connection_config, "bastion")
    assert bastion["stricthostkeychecking"] == "true" and bastion["batchmode"] == "yes"
    assert bastion["user"] != "deploy" and bastion["port"] != "22"


def test_a_known_hosts_setting_holds_the_keys_of_every_hop(ssh_config, tmp_path):
    known_hosts = tmp_path / "ci_known_hosts"
    [target] = targets(ssh_config, DEPLOY_SERVER="inner", SSH_KNOWN_HOSTS_FILE=str(known_hosts))
    bastion = ssh_g(Path(remote.ssh_options(target)[1]), "bastion")
    assert bastion["userknownhostsfile"] == str(known_hosts)
    assert bastion["globalknownhostsfile"] == "/dev/null"


def test_an_alias_that_is_no_host_and_does_not_resolve_is_named_in_one_line(ssh_config):
    error, _ = connection_error(ssh_config, "ceoa-typo")
    assert error == (
        f"SSH to ceoa-typo: ceoa-typo is neither a Host of the SSH configuration ({ssh_config}) "
        f"nor a name that resolves; add `Host ceoa-typo` with its HostName there (SSH_CONFIG "
        f"names another file), or correct DEPLOY_SERVER")


def test_a_refused_connection_points_at_the_configuration_that_named_the_port(ssh_config):
    error, target = connection_error(ssh_config, "refused")
    assert error == (
        f"SSH to refused (deploy@127.0.0.1:{target.port}): connection refused; is the server up, "
        f"with SSH on port {target.port} (Port of refused in {ssh_config}, or SSH_PORT)?")


def test_a_missing_or_broken_configuration_is_one_line(tmp_path, ssh_config):
    with pytest.raises(ToolkitError, match=r"^setting SSH_CONFIG: .*/absent does not exist"):
        targets(tmp_path / "absent", DEPLOY_SERVER="ceoa")
    broken = tmp_path / "broken"
    broken.write_text("Host x\n  NoSuchOption yes\n")
    with pytest.raises(ToolkitError) as raised:
        targets(broken, DEPLOY_SERVER="x")
    assert str(raised.value).startswith(f"SSH configuration {broken}: ssh cannot read it for x:")
    assert "\n" not in str(raised.value)


def test_the_connection_config_has_no_fallback_user_and_keeps_the_rules_first():
    text = config_file(None, None).read_text().splitlines()
    assert text.index("StrictHostKeyChecking yes") < text.index("Include ~/.ssh/config")
    assert not any(line.strip().startswith("User ") for line in text)


def test_a_bastion_that_refuses_is_named_as_the_bastion(ssh_config):
    error, _ = connection_error(ssh_config, "inner")
    assert error == (
        f"SSH to inner (deploy@192.0.2.2:22 via bastion): the bastion bastion refused the "
        f"connection; is it up, with SSH on the port its entry in {ssh_config} names?")


def test_setup_installs_the_public_half_of_the_identity_file_the_configuration_names(
        ssh_config, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "id_test")], check=True)
    ssh_config.write_text(ssh_config.read_text() + "Host *\n  IdentityFile ~/.ssh/personal\n")
    [ceoa] = targets(ssh_config, DEPLOY_SERVER="ceoa")
    assert deploy_public_key(load_settings(Path("/nonexistent"), environ={}), ceoa) == \
        (tmp_path / "id_test.pub").read_text().strip()
    # Only the catch-all's key: not this server's; the user is told what to set.
    [nouser] = targets(ssh_config, DEPLOY_SERVER="nouser")
    with pytest.raises(ToolkitError, match="setting DEPLOY_PUBLIC_KEY_FILE .* is needed"):
        deploy_public_key(load_settings(Path("/nonexistent"),
                                        environ={"DEPLOY_SERVER": "nouser"}), nouser)


def test_servers_connecting_at_once_all_get_the_whole_config_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from scripts.ssh_config import config_file

    known_hosts = tmp_path / f"known_hosts-{os.getpid()}"  # a file name no earlier call wrote
    start = Barrier(16)

    def connect(_):
        start.wait()
        return config_file(None, known_hosts)
    with ThreadPoolExecutor(16) as pool:
        paths = set(pool.map(connect, range(16)))
    (path,) = paths
    assert f'UserKnownHostsFile "{known_hosts}"' in path.read_text()
