"""Attacks on the boot-once preflight (conf/gunicorn.conf.py's candidate master), and the ways
a user's deploys get cut or interleaved with it: what the deploy user or the app's own code
(www-data) can make of the `candidate` link and the hand-over signal, and what a candidate or
a preflight unit left behind does to the next deploy, rollback or restore."""

from __future__ import annotations

import re
import time

import pytest
import requests

from scripts.loadgen import Load
from scripts.remote import Target, connect
from tests.conftest import new_sandbox
from tests.integration.helpers import health_answers_503
from tests.integration.site import Site
from tests.integration.test_data import deploy_backups, titles_in_backup
from tests.integration.test_hand_over import (UNIT, main_pid, masters, restart_detail,
                                              spare_port_listeners)

pytestmark = pytest.mark.integration

CANDIDATE = "/var/www/flask_helpdesk/candidate"


def status(site) -> str:
    with site.admin() as admin:
        return admin["systemctl"]("show", "-P", "StatusText", UNIT).strip()


def leave_candidate(site, release: str) -> int:
    """What a deploy killed after its preflight leaves (the deploy user can make one just so):
    a candidate master of RELEASE on the spare port. Its pid."""
    with site.deploy_user() as deploy:
        deploy["ln"]("-sfn", f"releases/{release}", CANDIDATE)
        deploy["sudo"]("-n", "systemctl", "kill", "--kill-whom=main", "--signal=SIGURG", UNIT)
    deadline = time.monotonic() + 10
    while not spare_port_listeners(site) and time.monotonic() < deadline:
        time.sleep(0.1)
    said = status(site)
    assert said.startswith(f"preflight of {release}: pid "), said
    return int(said.rpartition(" ")[2])


def two_releases(site, marker: str) -> tuple[str, str]:
    """Two deploys: the release of the first, and the one now live."""
    assert site.doit("deploy").returncode == 0
    first = site.served_release()
    site.change_code(marker)
    assert site.doit("deploy").returncode == 0
    return first, site.served_release()


def wait_until_gone(site, pid: int) -> None:
    deadline = time.monotonic() + 10
    while pid in masters(site) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid not in masters(site)


def test_a_restore_with_a_candidate_left_behind_hands_over_at_once(site):
    """A killed deploy left a candidate of another release; `doit restore` then hands the live
    release over to itself (so that the app reopens the restored database). The candidate must
    end, and the hand-over go on: not a wait of HEALTH_TIMEOUT_S and a restart."""
    first, live = two_releases(site, "restore with a candidate")
    candidate = leave_candidate(site, first)
    backups = deploy_backups(site.doit("backups").stdout)
    assert backups
    started = time.monotonic()
    restore = site.doit("restore", RESTORE_BACKUP=backups[-1], HEALTH_TIMEOUT_S="20")
    took = time.monotonic() - started
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert "booted beside the old release" in restart_detail(restore.stdout), restore.stdout
    assert took < 15, f"the restore took {took:.1f} s"
    wait_until_gone(site, candidate)
    assert spare_port_listeners(site) == ""
    assert site.served_release() == live


def test_a_preflight_unit_left_running_does_not_block_the_next_deploy(site):
    """A killed `doit rollback` or restore preflight (or the deploy user) leaves the preflight
    unit serving `next` on the spare port: the next deploy's candidate needs that port."""
    assert site.doit("deploy").returncode == 0
    with site.deploy_user() as deploy:
        deploy["sudo"]("-n", "systemctl", "start", f"{UNIT}-preflight")
    assert spare_port_listeners(site)
    site.change_code("after a preflight unit left running")
    result = site.doit("deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    preflight = next(line for line in result.stdout.splitlines() if " preflight " in line)
    assert "booted beside the live release" in preflight, preflight
    assert site.served_release() == site.built_release()
    with site.admin() as admin:
        state = admin["systemctl"]("is-active", f"{UNIT}-preflight", retcode=None).strip()
    assert state == "inactive"


# The app's own code (a request it exploits, as www-data): a signal to any process of its user.
SIGNALS = """

@bp.post("/signal-urg")
def signal_urg():
    import os
    import signal
    os.kill(int(request.args["pid"]), signal.SIGURG)
    return {"signalled": request.args["pid"]}
"""


def test_the_apps_own_signal_never_puts_a_candidate_live(site):
    """A candidate takes the live socket on SIGURG, which its live master sends at the switch;
    but any process of the app's user may send it that signal too. A candidate that answered
    no health check, whose release `current` does not name, must not serve a live request."""
    with site.edited("helpdesk/views.py", lambda text: text + SIGNALS):
        first, live = two_releases(site, "signals")
    candidate = leave_candidate(site, first)
    response = requests.post(site.url + "signal-urg", params={"pid": candidate}, timeout=10)
    assert response.status_code == 200, response.text
    time.sleep(1)
    served = {site.served_release() for _ in range(40)}
    assert served == {live}, served
    assert main_pid(site) in masters(site) and masters(site)[main_pid(site)] == live
    # What a failed preflight does still ends it.
    with site.deploy_user() as deploy:
        deploy["rm"]("-f", CANDIDATE)
        deploy["sudo"]("-n", "systemctl", "kill", "--kill-whom=main", "--signal=SIGURG", UNIT)
    wait_until_gone(site, candidate)
    assert spare_port_listeners(site) == ""


def test_a_candidate_link_outside_the_releases_boots_nothing_from_there(site):
    """The deploy user writes `candidate`: pointed outside releases/ (directly, through `..`,
    or through a link planted in releases/), the live master boots nothing at all (a link
    that names no release only ends a candidate)."""
    assert site.doit("deploy").returncode == 0
    live = site.served_release()
    before = masters(site)
    with site.deploy_user() as deploy:
        deploy["ln"]("-sfn", "/var/www/flask_helpdesk/shared", "/var/www/flask_helpdesk/"
                     "releases/planted")
        try:
            for target in ("/usr", "releases/../shared", "releases/planted"):
                deploy["ln"]("-sfn", target, CANDIDATE)
                deploy["sudo"]("-n", "systemctl", "kill", "--kill-whom=main",
                               "--signal=SIGURG", UNIT)
                time.sleep(1)
                assert spare_port_listeners(site) == "", target
                assert masters(site) == before, (target, before)
                assert not status(site).startswith("preflight of"), status(site)
        finally:
            deploy["rm"]("-f", CANDIDATE, "/var/www/flask_helpdesk/releases/planted")
    assert site.served_release() == live


def test_reads_and_writes_lose_nothing_around_a_candidate(site):
    """Under steady reads and writes: a deploy whose candidate takes over, a failed preflight
    (its candidate ends), a candidate left behind and a restore beside it, then a deploy of
    another release. Nothing refused, nothing cut off, no acknowledged write lost."""
    assert site.doit("deploy").returncode == 0
    reads = Load(site.url + "healthz", rate_per_s=20, max_requests=3000, max_seconds=180)
    writes = Load(site.url + "api/tickets", rate_per_s=20, max_requests=3000, max_seconds=180,
                  writes="candidate")
    with reads, writes:
        first = site.served_release()
        site.change_code("under load: taken over")
        taken = site.doit("deploy")
        assert taken.returncode == 0, taken.stdout + taken.stderr
        assert "at the preflight, and took over" in restart_detail(taken.stdout)
        with site.edited("helpdesk/views.py", health_answers_503):
            failed = site.doit("deploy", HEALTH_TIMEOUT_S="3")
        assert failed.returncode != 0 and "FAILED   preflight" in failed.stdout
        leave_candidate(site, first)
        backups = deploy_backups(site.doit("backups").stdout)
        restore = site.doit("restore", RESTORE_BACKUP=backups[-1])
        assert restore.returncode == 0, restore.stdout + restore.stderr
        site.change_code("under load: after the restore")
        after = site.doit("deploy")
        assert after.returncode == 0, after.stdout + after.stderr
    assert reads.report.failures == [] and writes.report.failures == [], (
        reads.report.failures[:5], writes.report.failures[:5])
    assert reads.report.sent > 50 and len(writes.report.acknowledged) > 50
    # The restore put back an older database: what it overwrote is in its safety backup.
    safety = re.search(r"the database it overwrote is saved in (\S+)", restore.stdout).group(1)
    kept = set(site.ticket_titles()) | titles_in_backup(site, safety)
    assert [t for t in writes.report.acknowledged if t not in kept] == []
    assert site.served_release() == site.built_release()


def test_a_deploy_that_fails_after_its_preflight_ends_its_candidate(site):
    """A pre-switch hook that fails ends the deploy after a healthy preflight: its candidate
    must not stay on the spare port, a whole app in memory, for CANDIDATE_WAIT_S."""
    assert site.doit("deploy").returncode == 0
    live = site.served_release()
    hooks = site.app_dir / "deploy-hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "pre-switch").write_text("#!/bin/sh\nexit 4\n")
    (hooks / "pre-switch").chmod(0o755)
    try:
        failed = site.doit("deploy")
    finally:
        (hooks / "pre-switch").unlink()
    assert failed.returncode != 0 and "FAILED   pre-switch" in failed.stdout, failed.stdout
    assert "booted beside the live release" in failed.stdout
    broken = site.built_release()
    deadline = time.monotonic() + 5
    while broken in masters(site).values() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broken not in masters(site).values(), masters(site)
    assert spare_port_listeners(site) == ""
    assert site.served_release() == live


# An app that appends to a file it keeps open and never flushes: CPython flushes such a file
# when the process ends the usual way.
AUDIT_LOG = """

AUDIT = []


@bp.post("/audit")
def audit():
    import os
    if not AUDIT:
        AUDIT.append(open(os.path.join(current_app.instance_path, "audit.log"), "a"))
    AUDIT[0].write(request.args["line"] + "\\n")
    return {"written": request.args["line"]}, 201
"""


def test_what_a_worker_wrote_to_a_file_it_kept_open_survives_its_end(site):
    """Workers end with os._exit after the atexit handlers (gunicorn.conf.py's worker_exit):
    lines an app acknowledged but left in an open file's buffer must still reach the file
    when the worker ends (here: the deploy after them retires the old workers)."""
    with site.edited("helpdesk/views.py", lambda text: text + AUDIT_LOG):
        assert site.doit("deploy").returncode == 0
        lines = [f"audit {number}" for number in range(20)]
        for line in lines:
            response = requests.post(site.url + "audit", params={"line": line}, timeout=10)
            assert response.status_code == 201, response.text
        site.change_code("the workers that wrote it end")
        assert site.doit("deploy").returncode == 0
    time.sleep(1)  # the old workers finish
    with site.admin() as admin:
        written = admin["sudo"]("-n", "cat", "/var/lib/flask-helpdesk/instance/audit.log",
                                retcode=None).splitlines()
    assert sorted(written) == sorted(lines), written


@pytest.fixture(scope="module")
def pair(tmp_path_factory, provisioned_layer, wheel_cache):
    work = tmp_path_factory.mktemp("pair")
    sandbox = new_sandbox(work / "sandbox")
    try:  # torn down whatever happens
        sandbox.up(2, layer=provisioned_layer)
        yield Site(work, sandbox, wheel_cache)
    finally:
        sandbox.down()


FAIL_HERE = "/etc/fail-this-pre-switch"  # made by the test on one server; the app user reads /etc


def admin_of(site, server) -> Target:
    return Target(server.host, server.ssh_port, "admin", site.sandbox.key_file,
                  site.sandbox.known_hosts_file)


def test_a_rollout_that_stops_before_the_switch_ends_every_candidate(pair):
    """Two servers: the first fails its pre-switch hook, so no server switches; the candidate
    the second one booted at its healthy preflight must end too, not hold its spare port and a
    whole app for CANDIDATE_WAIT_S."""
    assert pair.deploy().returncode == 0
    before = [requests.get(s.url + "healthz", timeout=10).json()["release"]
              for s in pair.sandbox.servers()]
    first, second = pair.sandbox.servers()
    hooks = pair.app_dir / "deploy-hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "pre-switch").write_text(f"#!/bin/sh\n[ ! -e {FAIL_HERE} ] || exit 4\n")
    (hooks / "pre-switch").chmod(0o755)
    with connect(admin_of(pair, first)) as machine:
        machine["sudo"]("-n", "touch", FAIL_HERE)
        try:
            pair.change_code("a rollout that stops")
            failed = pair.doit("deploy")
        finally:
            (hooks / "pre-switch").unlink()
            machine["sudo"]("-n", "rm", FAIL_HERE)
    assert failed.returncode != 0 and "FAILED   pre-switch" in failed.stdout, failed.stdout
    assert any(line.startswith(f"{second.name}: ") and "booted beside the live release" in line
               for line in failed.stdout.splitlines()), failed.stdout
    deadline = time.monotonic() + 5
    with connect(admin_of(pair, second)) as machine:
        while machine["ss"]("-Htln", "sport = :5001").strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert machine["ss"]("-Htln", "sport = :5001").strip() == ""
    assert [requests.get(s.url + "healthz", timeout=10).json()["release"]
            for s in pair.sandbox.servers()] == before


SLOW_HERE = "/etc/slow-this-pre-switch"  # made by the test; the app user reads /etc


def test_a_deploy_cancelled_after_its_preflight_is_finished_by_the_next_with_that_candidate(
        site):
    """CI cancels a deploy (SIGTERM) during its pre-switch hook: its candidate stays, and the
    same deploy run again keeps it (no second boot) and it takes over; no lock is left."""
    assert site.doit("deploy").returncode == 0
    hooks = site.app_dir / "deploy-hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "pre-switch").write_text(f"#!/bin/sh\n[ ! -e {SLOW_HERE} ] || sleep 20\n")
    (hooks / "pre-switch").chmod(0o755)
    try:
        with site.admin() as admin:
            admin["sudo"]("-n", "touch", SLOW_HERE)
        site.change_code("cancelled after its preflight")
        deploy = site.start_doit("deploy")
        output = []
        for line in deploy.stdout:
            output.append(line)
            if " preflight " in line:
                deploy.terminate()
                break
        output += deploy.stdout.readlines()
        deploy.wait(timeout=60)
        assert deploy.returncode != 0, "".join(output)
        release = site.built_release()
        said = status(site)
        assert said.startswith(f"preflight of {release}: pid "), said
        candidate = int(said.rpartition(" ")[2])
        with site.admin() as admin:
            admin["sudo"]("-n", "rm", SLOW_HERE)
        again = site.doit("deploy")
    finally:
        (hooks / "pre-switch").unlink()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "at the preflight, and took over" in restart_detail(again.stdout)
    assert main_pid(site) == candidate  # the very master the cancelled deploy booted
    assert site.served_release() == release
    assert "lock     held" not in site.doit("status").stdout


def test_the_guides_reload_of_a_master_that_was_a_candidate_refuses_nothing(site):
    """`systemctl reload` (HUP) of the main master, which booted as a candidate and took over:
    it keeps serving the live socket, under steady reads."""
    site.change_code("reloaded after taking over")
    taken = site.doit("deploy")
    assert "at the preflight, and took over" in restart_detail(taken.stdout)
    main = main_pid(site)
    reads = Load(site.url + "healthz", rate_per_s=20, max_requests=400, max_seconds=8)
    with reads:
        time.sleep(1)
        with site.deploy_user() as deploy:
            deploy["sudo"]("-n", "systemctl", "reload", UNIT)
        time.sleep(3)
    assert reads.report.failures == [] and reads.report.sent > 50
    assert main_pid(site) == main
    assert set(reads.report.releases) == {site.built_release()}
    assert spare_port_listeners(site) == ""


def test_a_restore_after_a_deploy_cut_between_switch_and_restart(site):
    """A deploy cut right after its switch: `current` names a release that never went live,
    whose candidate still holds the spare port. `doit restore` runs that release's preflight
    in the preflight unit, on the same port."""
    first, live = two_releases(site, "cut between switch and restart")
    with site.deploy_user() as deploy:
        deploy["ln"]("-sfn", f"releases/{first}", CANDIDATE)
        deploy["sudo"]("-n", "systemctl", "kill", "--kill-whom=main", "--signal=SIGURG", UNIT)
        time.sleep(2)
        # `first` went live before; drop it from the good ones, as a release never live
        deploy["sh"]("-c", f"cd /var/www/flask_helpdesk && grep -vx {first} good-releases "
                           f"> good.tmp; mv good.tmp good-releases && "
                           f"ln -sfn releases/{first} current.tmp && mv -T current.tmp current")
    backups = deploy_backups(site.doit("backups").stdout)
    restore = site.doit("restore", RESTORE_BACKUP=backups[-1])
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert site.served_release() == first
