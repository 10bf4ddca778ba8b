"""Whose deploy lock is dead: recognised by the machine's identity (machine-id and boot id),
never by its host name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from scripts.deploy.lock import holder_is_dead, lock_info, machine_identity


def test_a_lock_records_this_machines_identity():
    info = lock_info("abc", "deploy")
    assert info["machine_id"] == open("/etc/machine-id").read().strip()
    assert info["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()


def test_a_live_deploy_on_another_machine_with_the_same_host_name_is_never_broken():
    # Two laptops called `debian`: same host name, same pid numbers, different machine-id.
    other = {**lock_info("abc", "deploy"), "machine_id": "0" * 32, "pid": 999999,
             "pid_start": "1"}
    assert other["host"] == socket.gethostname()
    assert not holder_is_dead(other)


def test_a_lock_from_an_earlier_boot_of_this_machine_is_dead():
    earlier = {**lock_info("abc", "deploy"), "boot_id": "00000000-0000-0000-0000-000000000000"}
    assert holder_is_dead(earlier)


def test_in_this_boot_a_lock_is_dead_only_when_its_process_is_gone():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stat = open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        held = {**lock_info("abc", "deploy"), "pid": process.pid, "pid_start": stat}
        assert not holder_is_dead(held)
    finally:
        process.kill()
        process.wait()
    assert holder_is_dead(held)
    assert not holder_is_dead({**held, "machine_id": ""})  # an old lock without identity


def test_this_process_holds_a_live_lock():
    assert not holder_is_dead(lock_info("abc", "deploy"))
    assert machine_identity()["machine_id"] and os.getpid()


def test_a_lock_of_an_older_toolkit_without_machine_id_gets_one_line_pointing_to_unlock():
    import pytest

    from scripts.deploy.lock import deploy_lock
    from scripts.errors import ToolkitError

    old = {key: value for key, value in lock_info("abc", "deploy").items()
           if key not in ("machine_id", "boot_id")}

    class Held:
        name, dry_run, deploy_path = "web-1", False, "/var/www/flask_helpdesk"

        def tool_call(self, subcommand, *args, what=""):
            return {"taken": False, "holder": old}

    with pytest.raises(ToolkitError) as error:
        with deploy_lock(Held(), "new"):
            pass
    message = str(error.value)
    assert "\n" not in message and message.startswith("web-1: the deploy lock was taken by an "
                                                      "older version")
    assert message.endswith("run `doit unlock`") and old["who"] in message
