"""The hand-over (conf/gunicorn.conf.py): a deploy boots the new release beside the old one in
the same unit, and parks the old master; a rollback to it wakes that very process. On a real
sandbox server: which process serves, what systemd knows, and that nothing is lost."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from scripts.loadgen import Load
from tests.integration.helpers import health_answers_503

pytestmark = pytest.mark.integration

UNIT = "flask-helpdesk"
RELEASES = "/var/www/flask_helpdesk/releases/"


def masters(site) -> dict[int, str]:
    """The service's gunicorn masters (its processes whose parent is outside it), each with
    the release it runs."""
    with site.admin() as admin:
        listing = admin["ps"]("-e", "-o", "pid=,ppid=,unit=")
        procs = {int(pid): int(ppid) for pid, ppid, unit in
                 (line.split() for line in listing.splitlines()) if unit == f"{UNIT}.service"}
        found = {}
        for pid, ppid in procs.items():
            if ppid not in procs:  # one that ends meanwhile (a master retiring) is left out
                cwd = admin["sudo"]("-n", "readlink", f"/proc/{pid}/cwd", retcode=None)
                if cwd.strip():
                    found[pid] = cwd.strip().removeprefix(RELEASES)
        return found


def main_pid(site) -> int:
    with site.admin() as admin:
        return int(admin["systemctl"]("show", "-P", "MainPID", UNIT))


def restart_detail(output: str) -> str:
    return next(line for line in output.splitlines() if " restart " in line)


def test_a_deploy_hands_over_and_parks_the_old_release_which_a_rollback_wakes(site):
    assert site.doit("deploy").returncode == 0
    old = site.served_release()
    site.change_code("hand-over")
    result = site.doit("deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    new = site.built_release()
    assert "booted beside the old release" in restart_detail(result.stdout)
    running = masters(site)
    assert running[main_pid(site)] == new
    parked = [pid for pid, release in running.items() if release == old]
    assert len(parked) == 1, running
    # The parked master has no workers: only the new release answers.
    with site.admin() as admin:
        assert admin["pgrep"]("-P", parked[0], retcode=None).strip() == ""
    assert site.served_release() == new

    rollback = site.doit("rollback")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert "woke from parked" in restart_detail(rollback.stdout)
    assert main_pid(site) == parked[0]  # the very process: nothing booted
    assert site.served_release() == old
    assert set(masters(site).values()) <= {old, new}


def journal_since(site, unit: str, since: str) -> str:
    with site.admin() as admin:
        return admin["sudo"]("-n", "journalctl", "-u", unit, "--since", since, "--no-pager",
                             "-o", "cat")


def server_now(site) -> str:
    time.sleep(1.1)  # journalctl --since counts whole seconds: nothing earlier in this one
    with site.admin() as admin:
        return admin["date"]("+%Y-%m-%d %H:%M:%S").strip()


def spare_port_listeners(site) -> str:
    with site.admin() as admin:
        return admin["sudo"]("-n", "ss", "-Htln", "sport = :5001").strip()


def test_a_deploy_boots_the_app_once_and_that_master_takes_over_at_the_switch(site):
    assert site.doit("deploy").returncode == 0
    site.change_code("booted once")
    since = server_now(site)
    result = site.doit("deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    preflight = next(line for line in result.stdout.splitlines() if " preflight " in line)
    assert "booted beside the live release" in preflight
    assert "at the preflight, and took over" in restart_detail(result.stdout)
    boots = [line for line in journal_since(site, UNIT, since).splitlines()
             if "Starting gunicorn" in line]
    assert len(boots) == 1, boots  # one boot: the preflight's master is the live one now
    assert f"[{main_pid(site)}]" in boots[0]
    assert "Starting" not in journal_since(site, f"{UNIT}-preflight", since)
    assert masters(site)[main_pid(site)] == site.built_release()
    assert spare_port_listeners(site) == ""  # the candidate left the spare port at the switch


def test_a_candidate_that_fails_or_is_left_behind_ends_and_never_serves(site):
    assert site.doit("deploy").returncode == 0
    good = site.served_release()
    with site.edited("helpdesk/views.py", health_answers_503):
        failed = site.deploy(HEALTH_TIMEOUT_S="3")
    assert failed.returncode != 0 and "FAILED   preflight" in failed.stdout
    broken = site.built_release()
    deadline = time.monotonic() + 5
    while broken in masters(site).values() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broken not in masters(site).values()
    assert spare_port_listeners(site) == ""
    assert site.served_release() == good
    # A deploy killed after its preflight leaves a candidate (the deploy user can make one
    # just so): the next rollback and deploy end it and go on as usual.
    with site.deploy_user() as deploy:
        deploy["ln"]("-sfn", f"releases/{good}", "/var/www/flask_helpdesk/candidate")
        deploy["sudo"]("-n", "systemctl", "kill", "--kill-whom=main", "--signal=SIGURG", UNIT)
    deadline = time.monotonic() + 5
    while not spare_port_listeners(site) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spare_port_listeners(site), "the candidate was not booted"
    site.change_code("after a candidate left behind")
    result = site.doit("deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert site.served_release() == site.built_release()
    rollback = site.doit("rollback")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert site.served_release() == good
    assert spare_port_listeners(site) == ""


AT_EXIT = """
import atexit, os
atexit.register(lambda: open(os.path.join(app.instance_path, "ended-%d" % os.getpid()), "w").close())
"""


def test_a_worker_that_ends_runs_the_apps_atexit_handlers(site):
    """Workers end without Python's teardown (gunicorn.conf.py's worker_exit), but what the app
    registered to run at exit still runs: here it leaves a file named after the worker."""
    with site.edited("wsgi.py", lambda text: text + AT_EXIT):
        assert site.deploy().returncode == 0
        with site.admin() as admin:
            workers = admin["pgrep"]("-P", main_pid(site)).split()
        site.change_code("the workers that registered it end")
        assert site.deploy().returncode == 0
    assert workers
    with site.admin() as admin:
        left = admin["sudo"]("-n", "ls", "/var/lib/flask-helpdesk/instance").split()
    assert {f"ended-{pid}" for pid in workers} <= set(left), left


def test_the_guides_restart_with_a_parked_master_waits_for_requests(site):
    """systemd must know the new master as its own child: else `systemctl restart` kills it
    (and its requests) at once instead of letting it finish."""
    site.change_code("restart with a parked master")
    result = site.doit("deploy")
    assert "booted beside the old release" in restart_detail(result.stdout)
    assert len(masters(site)) == 2
    main = main_pid(site)
    with site.admin() as admin:
        assert admin["ps"]("-o", "ppid=", "-p", main).strip() == "1"
        since = admin["date"]("+%Y-%m-%d %H:%M:%S").strip()
    writes = Load(site.url + "api/tickets", rate_per_s=20, max_requests=400, max_seconds=30,
                  writes="restart")
    with writes:
        with site.deploy_user() as deploy:
            deploy["sudo"]("-n", "systemctl", "restart", UNIT)
    assert writes.report.failures == []
    assert len(writes.report.acknowledged) > 0
    titles = set(site.ticket_titles())
    assert [t for t in writes.report.acknowledged if t not in titles] == []
    with site.admin() as admin:
        journal = admin["sudo"]("-n", "journalctl", "-u", UNIT, "--no-pager", "-o", "cat",
                                "--since", since)
    # The main master finished its requests; only the parked one (no workers) may be killed.
    assert f"[{main}] [INFO] Shutting down: Master" in journal, journal
    assert f"Killing process {main} " not in journal, journal
    assert list(masters(site).values()) == [site.served_release()]


def test_a_changed_app_environment_restarts_instead_of_handing_over(site):
    """A hand-over passes the running service's environment on; a new one needs a restart."""
    env_file = site.work / "hand-over.env"
    env_file.write_text("HAND_OVER_CHECK=1\n")
    site.change_code("environment one")
    first = site.doit("deploy", APP_ENV_FILE=str(env_file))
    assert first.returncode == 0, first.stdout + first.stderr
    site.change_code("same environment")
    same = site.doit("deploy", APP_ENV_FILE=str(env_file))
    assert "booted beside the old release" in restart_detail(same.stdout)
    env_file.write_text("HAND_OVER_CHECK=2\n")
    site.change_code("environment two")
    changed = site.doit("deploy", APP_ENV_FILE=str(env_file))
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert restart_detail(changed.stdout).endswith(": restarted")
    assert len(masters(site)) == 1


def test_the_deploy_user_may_send_the_service_only_the_hand_over_signal(site):
    with site.deploy_user() as deploy:
        for signal in ("SIGKILL", "SIGTERM", "SIGSTOP"):
            refused = deploy["sudo"].run(("-n", "systemctl", "kill", "--kill-whom=main",
                                          f"--signal={signal}", UNIT), retcode=None)
            assert refused[0] != 0, signal
        for whom in ("all", "control"):
            refused = deploy["sudo"].run(("-n", "systemctl", "kill", f"--kill-whom={whom}",
                                          "--signal=SIGURG", UNIT), retcode=None)
            assert refused[0] != 0, whom
        other = deploy["sudo"].run(("-n", "systemctl", "kill", "--kill-whom=main",
                                    "--signal=SIGURG", "ssh"), retcode=None)
        assert other[0] != 0


def test_a_release_on_another_gunicorn_and_venv_is_handed_over_to_and_back(site):
    """The new master runs the new release's own venv (other requirements, another gunicorn),
    not the old master's; and the hooks fit that gunicorn too."""
    assert site.doit("deploy").returncode == 0
    old = site.served_release()
    with site.edited("requirements.txt",
                     lambda text: text.replace("gunicorn==27.0.1", "gunicorn==23.0.0")):
        result = site.doit("deploy")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "built shared/venvs/" in result.stdout  # a venv of its own
        assert "booted beside the old release" in restart_detail(result.stdout)
        new = site.built_release()
        assert site.served_release() == new
        with site.admin() as admin:
            main = main_pid(site)
            exe = admin["sudo"]("-n", "cat", f"/proc/{main}/cmdline").replace("\0", " ")
        assert f"releases/{new}/.venv/bin/python" in exe, exe
        rollback = site.doit("rollback")
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr
        assert "woke from parked" in restart_detail(rollback.stdout)
        assert site.served_release() == old


# An attacker's code in a worker (a request it exploits): it names itself the main process.
CLAIMS_MAIN_PID = """

@bp.post("/claim-main-pid")
def claim_main_pid():
    import os
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"MAINPID=%d\\nSTATUS=claimed" % os.getpid(), "/run/systemd/notify")
    return {"pid": os.getpid()}
"""


def test_a_worker_cannot_name_the_main_process(site):
    """systemd 252 supervises a main process it did not start without noticing its end: were
    a worker able to name itself (or a child it then reaps), root's next `systemctl stop`
    would kill whatever process got that number next. Only the main master may say who is
    main (it hands that on itself); the hand-over still works."""
    with site.edited("helpdesk/views.py", lambda text: text + CLAIMS_MAIN_PID):
        assert site.doit("deploy").returncode == 0
        site.change_code("claims")
        result = site.doit("deploy")
        assert "booted beside the old release" in restart_detail(result.stdout)
        main = main_pid(site)
        worker = requests.post(site.url + "claim-main-pid", timeout=10).json()["pid"]
        assert worker != main
        time.sleep(0.5)  # systemd reads the message
        with site.admin() as admin:
            status = admin["systemctl"]("show", "-P", "StatusText", UNIT).strip()
        assert main_pid(site) == main
        assert status == f"serving {site.built_release()}"


SLOW_ROUTE = """

@bp.get("/slow")
def slow():
    import time
    time.sleep(float(request.args["s"]))
    return {"slept": request.args["s"]}
"""


def test_a_stop_soon_after_a_hand_over_lets_the_old_masters_requests_finish(site):
    """The master handed over from still finishes its requests; a `systemctl restart` then
    must wait for them too: once the main process ends, systemd kills what is left of the
    unit (KillMode=mixed)."""
    with site.edited("helpdesk/views.py", lambda text: text + SLOW_ROUTE):
        assert site.doit("deploy").returncode == 0
        main = main_pid(site)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(requests.get, site.url + "slow?s=6", timeout=30)
            time.sleep(1)  # it runs in a worker of the main master now
            with site.deploy_user() as deploy:
                deploy["sudo"]("-n", "systemctl", "kill", "--kill-whom=main", "--signal=SIGURG",
                               UNIT)  # a hand-over (here: to the same release, as a restore)
                deadline = time.monotonic() + 10
                while main_pid(site) == main and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert main_pid(site) != main
                assert not slow.done()
                deploy["sudo"]("-n", "systemctl", "restart", UNIT)
            answer = slow.result()
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"slept": "6"}


def test_keep_previous_s_bounds_how_long_the_old_release_stays_parked(site):
    """KEEP_PREVIOUS_S=2: the parked master ends by itself; a later rollback boots instead."""
    assert site.doit("deploy", KEEP_PREVIOUS_S="2").returncode == 0  # setup applies it
    site.change_code("kept two seconds")
    result = site.doit("deploy", KEEP_PREVIOUS_S="2")
    assert "booted beside the old release" in restart_detail(result.stdout)
    assert len(masters(site)) == 2
    deadline = time.monotonic() + 10
    while len(masters(site)) == 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(masters(site)) == 1
    rollback = site.doit("rollback", KEEP_PREVIOUS_S="2")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert "booted beside the old release" in restart_detail(rollback.stdout)


def test_keep_previous_s_zero_keeps_no_parked_master(site):
    assert site.doit("deploy", KEEP_PREVIOUS_S="0").returncode == 0
    site.change_code("kept not at all")
    result = site.doit("deploy", KEEP_PREVIOUS_S="0")
    assert "the old one then ended" in restart_detail(result.stdout)
    deadline = time.monotonic() + 10  # the old master finishes its requests, then ends
    while len(masters(site)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(masters(site).values()) == [site.built_release()]
    assert site.doit("deploy").returncode == 0  # back to the default for what follows
