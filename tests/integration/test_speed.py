"""What makes deploys fast, on a provisioned sandbox server: one SSH connection per doit run
that no ssh process outlives, a same-package deploy that changes nothing, and a rollback under
reads and writes that loses no request. Timings live in scripts/benchmark.py, not here."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from scripts.loadgen import Load

pytestmark = pytest.mark.integration


def accepted_logins(site) -> int:
    """How many SSH connections the deploy user opened on the server so far."""
    with site.admin() as admin:
        journal = admin["sudo"]("-n", "journalctl", "--no-pager", "-o", "cat", "-u", "ssh")
    return sum(1 for line in journal.splitlines() if "Accepted publickey for deploy" in line)


def masters_of(port: int) -> list[int]:
    """ssh master processes (ssh -M) that lead to this port."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"ssh") and b"-M" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found


def server_state(site) -> dict:
    with site.deploy_user() as deploy:
        root = "/var/www/flask_helpdesk"
        return {"current": deploy["readlink"](f"{root}/current").strip(),
                "good": deploy["cat"](f"{root}/good-releases"),
                "releases": deploy["ls"](f"{root}/releases"),
                "log": deploy["cat"](f"{root}/deploy-log.jsonl")}


def test_a_deploy_uses_one_ssh_connection_and_leaves_no_master(site):
    first = site.doit("deploy")  # provisions too (setup logs in to check the deploy key)
    assert first.returncode == 0, first.stdout + first.stderr
    site.change_code("one connection")
    before = accepted_logins(site)
    result = site.doit("deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    # check, ship and verify (and target) share the run's one connection.
    assert accepted_logins(site) - before == 1
    assert masters_of(site.server.ssh_port) == []
    # ... and its one server tool process (`serve`), which ends with the run.
    with site.admin() as admin:
        left = admin["ps"]("-u", "deploy", "-o", "args=", retcode=None)
    assert "server_tool" not in left, left


def test_the_same_package_again_changes_nothing_on_the_server(site):
    assert site.doit("deploy").returncode == 0
    before = server_state(site)
    result = site.doit("deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already live and good" in result.stdout
    assert "lock" not in result.stdout and "changed" not in result.stdout
    assert server_state(site) == before


def test_rollback_and_deploy_under_reads_and_writes_lose_nothing(site):
    site.change_code("under load")
    assert site.doit("deploy").returncode == 0
    reads = Load(site.url + "healthz", rate_per_s=20, max_requests=2000, max_seconds=120)
    writes = Load(site.url + "api/tickets", rate_per_s=20, max_requests=2000, max_seconds=120,
                  writes="speed")
    with reads, writes:
        for _ in range(2):
            rollback = site.doit("rollback")
            assert rollback.returncode == 0, rollback.stdout + rollback.stderr
            again = site.doit("deploy")
            assert again.returncode == 0, again.stdout + again.stderr
    assert reads.report.failures == [] and writes.report.failures == []
    assert reads.report.sent > 50 and len(writes.report.acknowledged) > 50
    titles = set(site.ticket_titles())
    assert [t for t in writes.report.acknowledged if t not in titles] == []
    history = [json.loads(line) for line in server_state(site)["log"].splitlines()]
    assert [entry["action"] for entry in history[-4:]] == ["rollback", "deploy"] * 2


def serve_processes(site) -> list[str]:
    """The deploy user's server tool processes on the server (a run's serve processes)."""
    with site.admin() as admin:
        listing = admin["ps"]("-u", "deploy", "-o", "args=", retcode=None)
    return [line for line in listing.splitlines() if "server_tool" in line]


def test_a_deploy_user_whose_bashrc_prints_deploys_and_leaves_no_serve_process(site):
    """bash reads ~/.bashrc for `ssh host command`, so what it prints comes first on the serve
    channel: read past, it never shifts a call's answer onto the next call."""
    bashrc = "/home/deploy/.bashrc"
    with site.admin() as admin:
        admin["sudo"]("-n", "sed", "-i", r"1i echo 'Welcome, deploy'; printf 'no newline'",
                      bashrc)
    try:
        site.change_code("a chatty bashrc")
        result = site.doit("deploy")
        assert result.returncode == 0, result.stdout + result.stderr
        assert site.served_release() == site.built_release()
        assert serve_processes(site) == []
    finally:
        with site.admin() as admin:
            admin["sudo"]("-n", "sed", "-i", "1d", bashrc)


def test_a_link_cut_between_two_tasks_of_a_deploy_is_one_ssh_line_and_the_next_works(site):
    """check parks its connection for ship; the link is cut in between (the sandbox's port
    forwarders frozen) and stays cut. ship must not wait on the dead parked connection and
    blame a step: one line in ssh's words, in bounded time, no lock left behind."""
    assert site.doit("deploy").returncode == 0
    site.change_code("a cut between tasks")
    forwarders = [helper.pgid for helper in site.server.helpers]
    deploy = site.start_doit("deploy")
    output = []
    try:
        for line in deploy.stdout:
            output.append(line)
            if line.startswith("ok       provisioned by this"):  # check's last line
                os.kill(deploy.pid, signal.SIGSTOP)  # between check and ship
                for group in forwarders:
                    os.killpg(group, signal.SIGSTOP)
                cut = time.monotonic()
                os.kill(deploy.pid, signal.SIGCONT)
                break
        output += deploy.stdout.readlines()
        deploy.wait(timeout=120)
        waited = time.monotonic() - cut
    finally:
        for group in forwarders:
            os.killpg(group, signal.SIGCONT)
    text = "".join(output)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert deploy.returncode != 0 and len(errors) == 1, text
    assert "no answer within" in errors[0] and "bug in the toolkit" not in text, text
    assert waited < 60, text
    again = site.doit("deploy")
    assert again.returncode == 0, again.stdout + again.stderr
    assert site.served_release() == site.built_release()


def test_the_serve_process_runs_bytecode_the_servers_python_compiled(site):
    """The server tool's source is compiled once, by the server's python3, when it is
    installed: with the source unreadable a deploy still works, so no run reads it. Bytecode
    that does not load (another python3's, after an upgrade) is written again."""
    assert site.doit("deploy").returncode == 0
    tools = "/var/www/flask_helpdesk/.deploy-tool"
    with site.deploy_user() as deploy:
        source = deploy["sh"]("-c", f"ls {tools}/server_tool-*.py").split()[-1]
        magic = "import importlib.util, sys; sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"
        wanted = deploy["python3"]("-c", magic)
        deploy["sh"]("-c", f"printf 'xxxx' | dd of={source}c bs=4 count=1 conv=notrunc "
                           f"status=none")
    site.change_code("bytecode of another python")
    assert site.doit("deploy").returncode == 0  # it compiled the bytecode again
    try:
        with site.deploy_user() as deploy:
            deploy["chmod"]("000", source)
        site.change_code("the source unreadable")
        result = site.doit("deploy")
        assert result.returncode == 0, result.stdout + result.stderr
        assert site.served_release() == site.built_release()
    finally:
        with site.deploy_user() as deploy:
            deploy["chmod"]("644", source)
    with site.deploy_user() as deploy:
        written = deploy["python3"]("-c", f"import sys; sys.stdout.write(open('{source}c', "
                                          f"'rb').read(4).hex())")
    assert written == wanted
