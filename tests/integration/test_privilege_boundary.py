"""The deploy user and the app can never become root (README, Security): an attacker holding the
deploy key, or running code as the app (www-data), plants links and files wherever that user
can write, then everything root runs afterwards runs: server_setup.sh (`doit setup`), deploys,
rollbacks, restores, `doit logs`, log rotation, and every sudo rule with its allowed arguments.
Pass: no root-owned file changes owner, mode or content, no root-only content is ever printed
or copied, and no shell as root or as another user is gained. Each test names its route (R1..)
as the README's table does."""

from __future__ import annotations

import secrets
import shlex

import pytest
import requests

from scripts.embed_templates import current_script
from tests.integration.helpers import script_lines

pytestmark = pytest.mark.integration

DEPLOY_PATH = "/var/www/flask_helpdesk"
LOG_PATH = "/var/log/flask_helpdesk"
BACKUP_PATH = "/var/backups/flask_helpdesk"
DATA_PATH = "/var/lib/flask-helpdesk"  # the app's data, under a folder only root writes (R20)
CANARY_FILE = "/root/canary"       # root-only content: must never be printed or copied
CANARY_DIR = "/root/canary-dir"    # a root-owned folder: must never change owner or mode
SECRET = "ROOT-ONLY-" + secrets.token_hex(8)
# What root owns and an attack would aim at: owner, mode, size and content of each.
WATCHED = [CANARY_FILE, CANARY_DIR, f"{CANARY_DIR}/f", "/etc/shadow", "/etc/passwd",
           "/etc/group", "/etc/sudoers", "/etc/sudoers.d", "/etc/systemd/system",
           "/etc/flask-helpdesk", "/etc/logrotate.d", "/usr/local/sbin", "/etc/cron.d", "/root"]


def run(machine, script: str) -> tuple[int, str]:
    """A shell script on the server; its status and its output (stderr joined)."""
    status, stdout, stderr = machine["sh"]["-c", f"exec 2>&1; {script}"].run(retcode=None)
    return status, stdout + stderr


@pytest.fixture(scope="module")
def armed(site):
    """A deployed server with root-only canaries, and `less` (the pager a user may add)."""
    result = site.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    with site.admin() as admin:
        status, output = run(admin, f"""
            sudo install -m 600 /dev/null {CANARY_FILE}
            echo 'ROOT_SECRET={SECRET}' | sudo tee {CANARY_FILE} >/dev/null
            sudo install -d -m 700 {CANARY_DIR}
            echo '{SECRET}' | sudo tee {CANARY_DIR}/f >/dev/null
            # Every sandbox server shares one .deb cache: another may hold its lock a while.
            for try in $(seq 30); do
              sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q less >/dev/null \\
                2>/tmp/apt.err && break
              grep -q 'Could not get lock' /tmp/apt.err || break
              sleep 2
            done
            cat /tmp/apt.err >&2; command -v less""")
        assert status == 0, output
    return site


def root_state(site) -> str:
    paths = " ".join(WATCHED)
    with site.admin() as admin:
        status, output = run(admin, f"sudo find {paths} -xdev -maxdepth 2 "
                                    f"-printf '%p %u %g %m %s %l\\n' | sort; sudo find {paths} "
                                    f"-xdev -maxdepth 2 -type f -exec sha256sum {{}} + | sort")
    assert status == 0, output
    return output


def as_deploy(site, script: str) -> tuple[int, str]:
    with site.deploy_user() as machine:
        return run(machine, script)


def as_app(site, script: str) -> tuple[int, str]:
    """As www-data outside its sandbox: more than a compromised app can do inside it."""
    with site.admin() as admin:
        return run(admin, f"cd / && sudo -u www-data sh -c {shlex.quote(script)}")


def no_secret(*outputs: str) -> None:
    for output in outputs:
        assert SECRET not in output


@pytest.mark.parametrize("attacker", ["deploy", "www-data"])
def test_r1_r2_nobody_but_root_can_put_a_link_in_the_log_folder(armed, attacker):
    before = root_state(armed)
    plant = as_deploy if attacker == "deploy" else as_app
    status, output = plant(armed, f"""
        ln -sf {CANARY_FILE} {LOG_PATH}/app.log; echo "link $?"
        ln -s {CANARY_FILE} {LOG_PATH}/other.log; echo "new $?"
        mv {LOG_PATH}/error.log {LOG_PATH}/moved.log; echo "move $?"
        ln {CANARY_FILE} {LOG_PATH}/hard.log; echo "hard $?"
        ln -sf {CANARY_FILE} /var/log/nginx/flask_helpdesk_error.log; echo "nginx $?" """)
    assert "link 0" not in output and "new 0" not in output and "move 0" not in output
    assert "hard 0" not in output and "nginx 0" not in output and "hard 1" in output
    _, tails = as_deploy(armed, f"sudo -n tail -n 100 {LOG_PATH}/app.log; "
                                f"sudo -n tail -n 100 {LOG_PATH}/error.log; sudo -n tail -n 100 "
                                f"/var/log/nginx/flask_helpdesk_error.log")
    logs = armed.doit("logs")
    no_secret(output, tails, logs.stdout, logs.stderr)
    assert root_state(armed) == before


def test_r3_the_app_writes_only_its_own_log_files(armed):
    status, output = as_app(armed, f"echo line-from-the-app >> {LOG_PATH}/app.log && "
                                   f"rm -f {LOG_PATH}/app.log; echo rm $?")
    assert "rm 0" not in output
    _, listing = as_deploy(armed, f"stat -c '%U %G %a' {LOG_PATH} {LOG_PATH}/app.log")
    assert listing.split("\n")[:2] == ["root root 755", "www-data www-data 640"]
    _, tail = as_deploy(armed, f"sudo -n tail -n 100 {LOG_PATH}/app.log")
    assert "line-from-the-app" in tail


def test_r4_log_rotation_runs_as_root_and_touches_only_the_apps_files(armed):
    before = root_state(armed)
    as_app(armed, f"ln -s {CANARY_FILE} {LOG_PATH}/app.log.1; echo x >> {LOG_PATH}/app.log")
    with armed.admin() as admin:
        status, output = run(admin, "sudo logrotate -f /etc/logrotate.d/flask_helpdesk && "
                                    f"sudo ls -l {LOG_PATH} && sudo zcat -f {LOG_PATH}/*")
    assert status == 0, output
    assert "www-data www-data" in output and "app.log.1" in output
    no_secret(output)
    assert root_state(armed) == before


@pytest.mark.parametrize("planted", [f"ln -sf {CANARY_FILE} ~/.ssh/authorized_keys",
                                     f"mv ~/.ssh ~/.ssh.mine && ln -s {CANARY_DIR} ~/.ssh"],
                         ids=["authorized_keys", "ssh_folder"])
def test_r5_r6_setup_never_writes_through_the_deploy_users_home(armed, planted):
    before = root_state(armed)
    status, output = as_deploy(armed, f"cp ~/.ssh/authorized_keys /tmp/keys.mine && {planted}")
    assert status == 0, output
    with armed.admin() as admin:  # deploy cannot log in any more: root puts its key back
        try:
            setup = armed.doit("setup")
        finally:
            run(admin, "cd /home/deploy && sudo rm -f .ssh/authorized_keys; sudo rm -f .ssh; "
                       "sudo mv .ssh.mine .ssh 2>/dev/null; sudo install -m 600 -o deploy "
                       "-g deploy /tmp/keys.mine .ssh/authorized_keys")
    assert setup.returncode != 0
    assert "error: could not add the deploy key" in setup.stdout + setup.stderr
    no_secret(setup.stdout, setup.stderr)
    assert root_state(armed) == before
    assert armed.doit("setup").returncode == 0


@pytest.mark.parametrize("folder", ["releases", "shared", "shared/venvs"])
def test_r7_r8_r9_setup_refuses_a_folder_swapped_for_a_link(armed, folder):
    before = root_state(armed)
    moved = f"{DEPLOY_PATH}/{folder}.mine"
    # Even the app's folder: deploy owns the folder that holds it, so deploy can rename it.
    status, output = as_deploy(armed, f"mv {DEPLOY_PATH}/{folder} {moved} && "
                                      f"ln -s {CANARY_DIR} {DEPLOY_PATH}/{folder}")
    assert status == 0, output
    with armed.admin() as admin:
        try:
            setup = armed.doit("setup")
        finally:
            run(admin, f"sudo rm {DEPLOY_PATH}/{folder} && sudo mv {moved} {DEPLOY_PATH}/{folder}")
    assert setup.returncode != 0
    errors = [line for line in (setup.stdout + setup.stderr).splitlines() if "error:" in line]
    assert errors and "symbolic link" in errors[0]
    assert root_state(armed) == before
    assert armed.doit("setup").returncode == 0


def test_r10_the_apps_environment_is_never_read_through_a_link(armed):
    before = root_state(armed)
    _, output = as_deploy(armed, f"""
        ln -sf {CANARY_FILE} /etc/flask-helpdesk/app.env; echo "swap $?"
        ln -sf {CANARY_FILE} {DEPLOY_PATH}/shared/.env
        sudo -n systemctl restart flask-helpdesk; echo "restart $?" """)
    assert "swap 0" not in output and "restart 0" in output
    with armed.admin() as admin:
        _, environ = run(admin, "sudo cat /proc/$(systemctl show -p MainPID --value "
                                "flask-helpdesk)/environ | tr '\\0' '\\n'")
        run(admin, f"sudo rm -f {DEPLOY_PATH}/shared/.env")
    assert "SECRET_KEY=" in environ  # the app's own environment was read
    no_secret(environ, output)
    assert root_state(armed) == before


def test_r11_sudo_runs_no_program_of_deploys_as_www_data(armed):
    _, output = as_deploy(armed, f"""
        {DEPLOY_PATH}/venv/bin/python --version; echo "genuine $?"
        mkdir -p /tmp/evil/bin && printf '#!/bin/sh\\nid\\n' > /tmp/evil/bin/python
        chmod +x /tmp/evil/bin/python
        ln -sfnT /tmp/evil {DEPLOY_PATH}/venv
        sudo -n -u www-data {DEPLOY_PATH}/venv/bin/python --version; echo "linked $?"
        ln -sfnT current/.venv {DEPLOY_PATH}/venv
        python=$(readlink -f {DEPLOY_PATH}/current/.venv)/bin/python
        mv "$python" "$python.real" && cp /tmp/evil/bin/python "$python"
        sudo -n -u www-data {DEPLOY_PATH}/venv/bin/python --version; echo "replaced $?"
        mv -f "$python.real" "$python" """)
    assert "Python 3." in output and "genuine 0" in output
    assert "linked 0" not in output and "replaced 0" not in output
    assert "uid=" not in output


# A sudo rule bound to a sha256 (the older `sudo -u www-data …/venv/bin/python --version`): sudo
# reads the file, checks the digest, then runs it (fexecve); the deploy user owns the file and
# rewrites it in between. Measured on the older rule: a shell as www-data on the 6th try.
DIGEST_RACE = r'''
import os, subprocess, time
original = open(os.path.realpath("/usr/bin/python3"), "rb").read()
folder = os.path.expanduser("~/fv/bin")
os.makedirs(folder, exist_ok=True)
target = folder + "/python"
with open(target, "wb") as stream:
    stream.write(original)
os.chmod(target, 0o755)
os.chmod(os.path.expanduser("~"), 0o755)
os.symlink(os.path.dirname(folder), "VENV.new")
os.replace("VENV.new", "VENV")
payload = b"#!/bin/sh\nid; echo RACED\nexit 0\n"
for attempt in range(200):
    with open(target, "r+b") as stream:
        stream.write(original[:len(payload)])
    run = subprocess.Popen(["sudo", "-n", "-u", "www-data", "VENV/bin/python", "--version"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started = time.monotonic()
    while time.monotonic() - started < (attempt % 40) * 0.0005:
        pass
    try:
        with open(target, "r+b") as stream:
            stream.write(payload)
    except OSError:
        pass
    print(run.communicate()[0].decode(errors="replace").strip())
os.symlink("current/.venv", "VENV.new")
os.replace("VENV.new", "VENV")
'''.replace("VENV", DEPLOY_PATH + "/venv")


def test_r19_no_sudo_rule_runs_a_file_deploy_can_rewrite(armed):
    _, listing = as_deploy(armed, "sudo -n -l")
    assert "(www-data)" not in listing and "sha256:" not in listing
    _, output = as_deploy(armed, f"python3 -c {shlex.quote(DIGEST_RACE)}")
    assert "RACED" not in output and "uid=33" not in output
    assert "a password is required" in output


def test_r12_no_sudo_rule_gives_deploy_a_shell_or_another_file(armed):
    _, rules = as_deploy(armed, "sudo -n -l")
    allowed = rules.split("may run the following commands")[1]
    assert "ALL" not in allowed.replace("NOPASSWD", "") and "*" not in allowed
    attempts = ["/bin/sh -c id", "-u www-data /bin/sh -c id", "-u root /bin/bash",
                "tail -n 100 /etc/shadow", f"tail -n 100 {LOG_PATH}/../../../etc/shadow",
                "tail -f /etc/shadow", "journalctl -u flask-helpdesk -f --file /etc/shadow",
                "systemctl start flask-helpdesk@x", "systemctl edit flask-helpdesk",
                "nginx -c /root/canary -t", "-u www-data /usr/bin/python3 -c 'print(1)'",
                f"-u www-data {DEPLOY_PATH}/venv/bin/python -c 'print(1)'",
                f"python3 {DEPLOY_PATH}/.deploy-tool/x.py", "-e /etc/shadow"]
    for attempt in attempts:
        status, output = as_deploy(armed, f"sudo -n {attempt}")
        assert status != 0 and "uid=0" not in output, attempt
        no_secret(output)
    # Every program a rule runs as root is root's, in folders only root can write.
    programs = sorted({line.split()[0] for line in allowed.replace(",", "\n").splitlines()
                       if line.strip().startswith("/")} | {"/usr/bin/systemctl"})
    _, owners = as_deploy(armed, "stat -L -c '%U %a' " + " ".join(
        f"{p} $(dirname {p})" for p in programs))
    for line in owners.splitlines():
        owner, mode = line.split()
        assert owner == "root" and int(mode, 8) & 0o022 == 0, owners


@pytest.mark.parametrize("command", ["journalctl -u flask-helpdesk",
                                     "systemctl status flask-helpdesk"])
def test_r13_the_pager_of_sudo_journalctl_and_systemctl_opens_no_shell(armed, command):
    marker = f"/tmp/pager-shell-{command.split()[0]}"
    # The second `q`: after "Command not available" the first key only clears that message;
    # without it the pager waits for `timeout` (20 s, twice per run of this test).
    typed = f"(sleep 1; printf '!touch {marker}\\r'; sleep 1; printf '\\rq'; sleep 1; printf q; " \
            f"sleep 1)"
    with armed.deploy_user() as deploy:
        _, control = run(deploy, f"export TERM=xterm; {typed} | timeout 20 script -qc "
                                 f"'stty rows 5 cols 80; less /etc/services' /dev/null; "
                                 f"test -e {marker} && echo control-ran; rm -f {marker}")
        assert "control-ran" in control  # the keys reach a pager: this test can fail
        _, output = run(deploy, f"export TERM=xterm; {typed} | timeout 20 script -qc "
                                f"'stty rows 5 cols 80; sudo -n {command}' /dev/null")
    assert "Command not available" in output
    with armed.admin() as admin:
        assert run(admin, f"test -e {marker}")[0] != 0


def test_r14_root_never_runs_the_server_tool_deploy_can_rewrite(armed):
    armed.change_code("a second release, to roll back from")
    assert armed.deploy().returncode == 0
    with armed.deploy_user() as deploy:
        _, tool = run(deploy, f"ls {DEPLOY_PATH}/.deploy-tool/*.py")
        tool = tool.split()[0]
        # Its bytecode removed too (the serve process runs that): the next run compiles the
        # rewritten source again, as the deploy user.
        status, output = run(deploy, f"""
            cp {tool} /tmp/tool.real && rm -f {tool}c && cat > {tool} <<'EOF'
import os, runpy, sys
open("/tmp/tool-ran-as-%d" % os.getuid(), "w").close()
sys.argv[0] = "/tmp/tool.real"
runpy.run_path("/tmp/tool.real", run_name="__main__")
EOF""")
        assert status == 0, output
        try:
            results = [armed.doit(*task) for task in
                       (("setup",), ("status",), ("logs",), ("backups",), ("rollback",))]
        finally:
            run(deploy, f"cp /tmp/tool.real {tool} && rm -f {tool}c")
    assert all(result.returncode == 0 for result in results), results[-1].stderr
    with armed.admin() as admin:
        _, markers = run(admin, "ls /tmp/tool-ran-as-*")
    assert "tool-ran-as-" in markers  # the rewritten tool did run, as deploy
    assert "tool-ran-as-0" not in markers
    assert armed.deploy().returncode == 0


def test_r15_backups_and_restores_follow_no_planted_link(armed):
    before = root_state(armed)
    armed.create_ticket("before the planted links")
    as_deploy(armed, f"ln -sfn {CANARY_DIR} {BACKUP_PATH}/20990101T000000000000Z-evil")
    profile_before = as_deploy(armed, "sha256sum ~/.profile")[1]
    instance = f"{DEPLOY_PATH}/shared/instance"
    as_app(armed, f"ln -sf /home/deploy/.profile {instance}/helpdesk.sqlite3-journal")
    try:
        evil = armed.doit("restore", RESTORE_BACKUP="20990101T000000000000Z-evil")
        backups = armed.doit("backups")
        name = [line.split()[-1] for line in backups.stdout.splitlines()
                if "RESTORE_BACKUP=" not in line and "Z-" in line][0]
        planted = armed.doit("restore", RESTORE_BACKUP=name)
    finally:
        as_app(armed, f"rm -f {instance}/helpdesk.sqlite3-journal")
        as_deploy(armed, f"rm -f {BACKUP_PATH}/20990101T000000000000Z-evil")
    assert evil.returncode != 0 and planted.returncode != 0
    assert "is a link or not a plain file" in planted.stderr
    assert as_deploy(armed, "sha256sum ~/.profile")[1] == profile_before
    no_secret(evil.stdout, evil.stderr, planted.stdout, planted.stderr, backups.stdout)
    assert root_state(armed) == before
    assert "before the planted links" in armed.ticket_titles()


# A hot journal as SQLite writes it (no pages to roll back) whose last record names a
# "super-journal": whoever opens the database read-write rolls the journal back, then deletes
# the super-journal when no other journal names it.
HOT_JOURNAL = r'''
import os, struct, sys
db, victim = sys.argv[1], sys.argv[2].encode()
with open(db, "rb") as stream:
    page = struct.unpack(">H", stream.read(18)[16:18])[0] or 65536
magic = bytes([0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
pages = os.path.getsize(db) // page
header = (magic + struct.pack(">IIIII", 0, 1, pages, 512, page)).ljust(512, b"\0")
super_record = (struct.pack(">I", 0x40000000 // page + 1) + victim
                + struct.pack(">II", len(victim), sum(victim)) + magic)
with open(db + "-journal", "wb") as stream:
    stream.write(header + super_record)
os.chmod(db + "-journal", 0o660)
'''


def test_r18_a_hot_journal_planted_by_the_app_is_never_rolled_back_by_deploy(armed):
    instance = f"{DEPLOY_PATH}/shared/instance"
    database = f"{instance}/helpdesk.sqlite3"
    armed.create_ticket("before the hot journal")
    as_deploy(armed, "echo precious > ~/victim")
    scheduled = f"{BACKUP_PATH}/scheduled"
    with armed.admin() as admin:  # the timer's backup, as the timer takes it
        status, output = run(admin, "sudo systemctl start flask-helpdesk-backup.service && "
                                    f"sudo ls {scheduled}")
    assert status == 0, output
    timer_backup = output.split()[-1]
    plant = f"python3 -c {shlex.quote(HOT_JOURNAL)}"
    as_app(armed, f"{plant} {database} /home/deploy/victim; "
                  f"{plant} {scheduled}/{timer_backup}/helpdesk.sqlite3 /home/deploy/victim")
    try:
        armed.change_code("after the hot journal")
        deployed = armed.deploy()          # backs the live database up before its migrations
        restored = armed.doit("restore", RESTORE_BACKUP=timer_backup)
        as_app(armed, f"rm -f {database}-journal")
        restored_scheduled = armed.doit("restore", RESTORE_BACKUP=timer_backup)
    finally:
        as_app(armed, f"rm -f {database}-journal")
    assert as_deploy(armed, "cat ~/victim")[1].strip() == "precious"
    assert deployed.returncode != 0 and "journal to roll back" in deployed.stderr
    assert restored.returncode != 0 and "journal to roll back" in restored.stderr
    assert restored_scheduled.returncode != 0
    assert "journal to roll back" in restored_scheduled.stderr
    assert "before the hot journal" in armed.ticket_titles()


@pytest.mark.parametrize("setting, value", [("RELEASE", ".."), ("RELEASE", "."),
                                            ("RESTORE_BACKUP", ".."),
                                            ("RESTORE_BACKUP", "../../../root")])
def test_r16_names_that_are_not_releases_or_backups_are_refused(armed, setting, value):
    served = armed.served_release()
    task = "rollback" if setting == "RELEASE" else "restore"
    result = armed.doit(task, **{setting: value})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"setting {setting}=" in errors[0], result.stderr
    assert armed.served_release() == served


def test_r17_a_deploy_after_deploy_planted_links_everywhere_changes_nothing_of_roots(armed):
    before = root_state(armed)
    as_deploy(armed, f"""
        ln -sfn {CANARY_DIR} {DEPLOY_PATH}/releases/zzz-planted
        ln -sfn {CANARY_DIR} {DEPLOY_PATH}/shared/venvs/planted
        ln -sf {CANARY_FILE} {DEPLOY_PATH}/packages/helpdesk-planted.tar.gz
        ln -sf {CANARY_FILE} {DEPLOY_PATH}/shared/.env.upload""")
    as_app(armed, f"ln -sfn {CANARY_DIR} {DEPLOY_PATH}/shared/uploads/planted")
    armed.change_code("after planted links")
    result = armed.deploy()
    setup = armed.doit("setup")
    assert result.returncode == 0, result.stdout + result.stderr
    assert setup.returncode == 0 and "changed:" not in "\n".join(script_lines(setup.stdout))
    no_secret(result.stdout, result.stderr, setup.stdout)
    assert root_state(armed) == before
    assert armed.served_release() == armed.built_release()


RUNNER = "/usr/local/sbin/flask-helpdesk-run"


def test_r21_the_runner_of_doit_run_starts_only_the_app_in_its_sandbox(armed):
    """`sudo flask-helpdesk-run` (doit run, deploy hooks) takes any command from deploy, and
    runs it as www-data in the service's sandbox only: no other user, no shell outside it, no
    root file written or read, whatever deploy plants or passes."""
    before = root_state(armed)
    inside = f"""
        grep -E '^(Uid|NoNewPrivs|CapEff|CapPrm):' /proc/self/status
        sudo -n id; su -c id root </dev/null
        cat {CANARY_FILE} /etc/flask-helpdesk/app.env /etc/shadow
        ls {CANARY_DIR} /root /home/deploy
        for f in /etc/run-was-here /usr/local/sbin/run-was-here {RUNNER} \
            {DEPLOY_PATH}/current/run-was-here /etc/sudoers.d/x; do
            echo x >> "$f" && echo "WROTE $f"
        done"""
    status, output = as_deploy(armed, f"sudo -n {RUNNER} --pipe current -- sh -c "
                                      f"{shlex.quote(inside)}")
    assert "NoNewPrivs:\t1" in output and "CapEff:\t0000000000000000" in output, output
    assert "CapPrm:\t0000000000000000" in output and "Uid:\t33\t33\t33\t33" in output
    assert "WROTE" not in output and "uid=0" not in output
    no_secret(output)
    # Arguments that would choose the user, a property or a folder are the command's, or refused.
    attempts = [f"{RUNNER} --uid=0 current -- id", f"{RUNNER} --pipe current -p User=root -- id",
                f"{RUNNER} --pipe current -- --uid=0 id", f"{RUNNER} --pipe ../../root -- id",
                f"{RUNNER} --pipe /root -- id", f"-u www-data {RUNNER} --pipe current -- id",
                f"-u root {RUNNER} --pipe current -- --property=User=root id"]
    for attempt in attempts:
        _, output = as_deploy(armed, f"sudo -n {attempt}")
        assert "uid=0" not in output and "uid=1" not in output, (attempt, output)
    # A release folder that is deploy's link to root's: systemd enters it as www-data, or not.
    _, output = as_deploy(armed, f"""
        ln -sfn {CANARY_DIR} {DEPLOY_PATH}/releases/zz-run-planted
        sudo -n {RUNNER} --pipe zz-run-planted -- cat f; echo "planted $?"
        rm -f {DEPLOY_PATH}/releases/zz-run-planted""")
    assert "planted 0" not in output
    no_secret(output)
    # The app's environment file swapped for a link is refused by systemd's reading as root
    # (R10); the runner reads it the same way the service does.
    _, output = as_deploy(armed, f"""
        ln -sf {CANARY_FILE} /etc/flask-helpdesk/app.env; echo "linked $?"
        sudo -n {RUNNER} --pipe current -- printenv ROOT_SECRET; echo "ran $?" """)
    assert "linked 0" not in output
    no_secret(output)
    assert root_state(armed) == before


# Where the units' ReadWritePaths= pointed before R20 (now links the deploy user owns), and
# where they point now (folders the app owns, in a folder only root writes).
OLD_DATA_PLACES = [f"{DEPLOY_PATH}/shared/instance", f"{DEPLOY_PATH}/shared/uploads",
                   f"{BACKUP_PATH}/scheduled"]
DATA_PLACES = [f"{DATA_PATH}/instance", f"{DATA_PATH}/uploads", f"{DATA_PATH}/backups"]
APP_UNITS = ["flask-helpdesk", "flask-helpdesk-migrate", "flask-helpdesk-preflight",
             "flask-helpdesk-backup"]


def app_mountinfo(site, running: bool = True) -> str:
    """The mounts systemd made for the running app: a ReadWritePaths= entry is a bind mount.
    With running=False, an app that is not running (it cannot read a planted folder) has none."""
    with site.admin() as admin:
        status, output = run(admin, "pid=$(systemctl show -p MainPID --value flask-helpdesk); "
                                    "[ $pid != 0 ] || { systemctl status flask-helpdesk; "
                                    "exit 3; }; sudo cat /proc/$pid/mountinfo")
    if status == 3 and not running:
        return ""
    assert status == 0, output
    return output


def writable_paths_and_their_folders(site) -> list[str]:
    """`owner mode type path` of every unit's ReadWritePaths= and of each folder above it."""
    with site.admin() as admin:
        _, paths = run(admin, "; ".join(f"systemctl show -p ReadWritePaths --value {unit}"
                                        for unit in APP_UNITS))
        listed = sorted({item.lstrip("-") for item in paths.split()})
        assert listed, paths
        script = "; ".join(f"p={path}; while [ \"$p\" != / ]; do "
                           f"stat -c '%U %a %F %n' \"$p\"; p=$(dirname \"$p\"); done"
                           for path in listed)
        _, output = run(admin, script)
    return output.splitlines()


# A folder of root's that the app may write by its permissions, but that its sandbox keeps
# read-only (ProtectSystem=strict): what a link systemd followed would open to it.
VICTIM_DIR = "/etc/flask-helpdesk-victim"


@pytest.mark.parametrize("attacker", ["deploy", "www-data"])
def test_r20_the_units_writable_folders_cannot_be_swapped_for_a_link(armed, attacker):
    """systemd (root) follows a link in ReadWritePaths=: if the deploy user (or the app) could
    swap one of those folders for a link, the app could write /etc. Plant the link wherever
    the attacker can, restart the app (deploy's sudo rule), run the backup unit and `doit
    setup`: the app's mounts never include the planted target, nothing lands there, and every
    writable path sits under folders only root can write."""
    before = root_state(armed)
    plant = as_deploy if attacker == "deploy" else as_app
    with armed.admin() as admin:
        run(admin, f"sudo install -d -m 2770 -o root -g www-data {VICTIM_DIR}")
    _, planted = plant(armed, "; ".join(
        f"mv {place} {place}.mine && ln -s {VICTIM_DIR} {place}; echo \"{place} $?\""
        for place in OLD_DATA_PLACES + DATA_PLACES))
    try:
        as_deploy(armed, "sudo -n systemctl restart flask-helpdesk")
        swapped_mounts = app_mountinfo(armed)
        try:
            armed.create_ticket("through a planted link")
        except requests.RequestException:
            pass  # the app cannot write through the link: the sandbox holds
        with armed.admin() as admin:
            run(admin, "sudo systemctl start flask-helpdesk-backup.service")
        setup = armed.doit("setup")
        as_deploy(armed, "sudo -n systemctl restart flask-helpdesk")
        mounts_after_setup = app_mountinfo(armed)
        layout = writable_paths_and_their_folders(armed)
    finally:
        with armed.admin() as admin:
            run(admin, "; ".join(f"if [ -e {place}.mine ] || [ -L {place}.mine ]; then "
                                 f"sudo rm -f {place}; sudo mv {place}.mine {place}; fi"
                                 for place in OLD_DATA_PLACES + DATA_PLACES))
            _, written = run(admin, f"sudo find {VICTIM_DIR} -mindepth 1")
            run(admin, f"sudo rm -rf {VICTIM_DIR}; sudo systemctl restart flask-helpdesk")
    for place in DATA_PLACES:  # nobody but root can replace these
        assert f"{place} 0" not in planted
    assert VICTIM_DIR not in swapped_mounts and VICTIM_DIR not in mounts_after_setup
    assert written.strip() == ""
    assert f"{DATA_PATH}/instance" in mounts_after_setup
    for line in layout:
        owner, mode, kind = line.split()[:3]
        assert kind == "directory", line  # never a link systemd would follow
        if not line.endswith(tuple(DATA_PLACES)):
            assert owner == "root" and int(mode, 8) & 0o022 == 0, line
    assert setup.returncode == 0, setup.stdout + setup.stderr
    no_secret(planted, setup.stdout, setup.stderr)
    assert root_state(armed) == before
    assert armed.served_release() == armed.built_release()


def test_r20_a_server_set_up_before_moves_its_data_once_and_keeps_it(armed):
    """The layout older setups made: the data in real folders under DEPLOY_PATH and
    BACKUP_PATH, and the units pointing there. One `doit setup` moves it, the app keeps
    serving the same tickets, and the next run has nothing to do."""
    armed.create_ticket("before the move")
    with armed.admin() as admin:
        status, output = run(admin, "set -e; " + "; ".join(
            f"sudo rm {old}; sudo mv {new} {old}"
            for old, new in zip(OLD_DATA_PLACES, DATA_PLACES)) + f"""
            sudo sed -i -e 's|{DATA_PATH}/instance|{DEPLOY_PATH}/shared/instance|g' \\
              -e 's|{DATA_PATH}/uploads|{DEPLOY_PATH}/shared/uploads|g' \\
              -e 's|{DATA_PATH}/backups|{BACKUP_PATH}/scheduled|g' \\
              /etc/systemd/system/flask-helpdesk*.service
            sudo systemctl daemon-reload; sudo systemctl restart flask-helpdesk""")
    assert status == 0, output
    armed.create_ticket("in the old layout")
    setup = armed.doit("setup")
    again = armed.doit("setup")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    lines = script_lines(setup.stdout)
    for old, new in zip(OLD_DATA_PLACES, DATA_PLACES):
        assert any(line.startswith(f"changed: {old}/ ") and f" to {new}/" in line
                   for line in lines), lines
    assert again.returncode == 0 and "changed:" not in "\n".join(script_lines(again.stdout))
    with armed.admin() as admin:
        _, listing = run(admin, f"sudo stat -c '%U %G %a %N' {DATA_PATH} {' '.join(DATA_PLACES)} "
                                f"{' '.join(OLD_DATA_PLACES)}")
    assert listing.splitlines()[:4] == [
        f"root root 755 '{DATA_PATH}'", f"www-data www-data 2770 '{DATA_PATH}/instance'",
        f"www-data www-data 2770 '{DATA_PATH}/uploads'", f"www-data deploy 2750 '{DATA_PATH}/backups'"]
    for old, new in zip(OLD_DATA_PLACES, DATA_PLACES):
        assert f"'{old}' -> '{new}'" in listing
    armed.create_ticket("after the move")
    titles = armed.ticket_titles()
    assert {"before the move", "in the old layout", "after the move"} <= set(titles)
    assert any(line.endswith("-scheduled") for line in armed.doit("backups").stdout.split())


# As the deploy user: its authorized_keys becomes a FIFO, so the first thing setup runs as deploy
# (runuser … grep KEY ~/.ssh/authorized_keys) waits on it; meanwhile ptrace (same uid) makes
# that process read(0, …) once, then the keys go back and the process goes on.
STDIN_THIEF = r'''
import ctypes, os, sys, time
keys = os.path.expanduser("~/.ssh/authorized_keys")
loot = os.path.expanduser("~/stdin-loot")
os.rename(keys, keys + ".mine")
os.mkfifo(keys, 0o600)
saved = open(keys + ".mine", "rb").read()
if os.fork():
    sys.exit(0)
os.setsid()
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
Regs = ctypes.c_ulong * 27  # x86_64 user_regs_struct
RAX, RDX, RSI, RDI, ORIG_RAX, RIP, RSP = 10, 12, 13, 14, 15, 16, 19


def read_stdin_of(pid):
    """Make the stopped process read(0, ...) once, by ptrace (same uid), and return the bytes."""
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        return b"(attach refused %d)" % ctypes.get_errno()
    os.waitpid(pid, 0)
    regs, work = Regs(), Regs()
    libc.ptrace(12, pid, None, ctypes.byref(regs))  # PTRACE_GETREGS
    ctypes.memmove(work, regs, ctypes.sizeof(regs))
    mem = os.open("/proc/%d/mem" % pid, os.O_RDWR)
    try:
        if os.pread(mem, 2, regs[RIP] - 2) != b"\x0f\x05":
            return b"(not in a syscall)"
        buffer = regs[RSP] - 8192
        work[RIP], work[RAX], work[ORIG_RAX] = regs[RIP] - 2, 0, 2 ** 64 - 1
        work[RDI], work[RSI], work[RDX] = 0, buffer, 4096
        libc.ptrace(13, pid, None, ctypes.byref(work))  # PTRACE_SETREGS
        libc.ptrace(9, pid, None, None)  # PTRACE_SINGLESTEP over the syscall
        os.waitpid(pid, 0)
        libc.ptrace(12, pid, None, ctypes.byref(work))
        count = ctypes.c_long(work[RAX]).value
        return os.pread(mem, count, buffer) if count > 0 else b"(read %d)" % count
    finally:
        os.close(mem)
        libc.ptrace(13, pid, None, ctypes.byref(regs))
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH


stolen = b"(no process of mine read the keys)"
try:
    deadline, found = time.monotonic() + 300, None
    while found is None and time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(pid) != os.getpid() and os.stat("/proc/" + pid).st_uid == os.getuid() \
                        and keys.encode() in open("/proc/%s/cmdline" % pid, "rb").read():
                    found = int(pid)
                    break
            except OSError:
                pass
        time.sleep(0.01)
    if found:
        time.sleep(0.3)  # let it block in open()
        stolen = b"read:" + read_stdin_of(found)
except Exception as error:
    stolen = b"(thief failed: %r)" % error
finally:
    fifo = os.open(keys, os.O_RDWR)  # never blocks; whoever waits on the FIFO gets the keys
    os.rename(keys + ".mine", keys)
    os.write(fifo, saved)
    time.sleep(1)
    os.close(fifo)
    with open(loot, "wb") as stream:
        stream.write(stolen)
'''


def test_r22_a_sudo_password_sudo_did_not_need_never_reaches_a_process_of_deploys(armed):
    """SETUP_SUDO_PASSWORD goes to `sudo -S` on stdin; when sudo needs none (NOPASSWD, as the
    sandbox's admin has, or SETUP_USER root) it stays unread in the setup script's stdin,
    which every child inherits, those running as deploy too: deploy attaches to one (same uid)
    and reads the password. Measured before the fix: the admin's password, every time. The
    script's children get no stdin at all, and root's setup is sent no password."""
    password = "sudo-" + secrets.token_hex(8)
    status, output = as_deploy(armed, f"rm -f ~/stdin-loot; python3 -c {shlex.quote(STDIN_THIEF)}"
                                      " </dev/null >/dev/null 2>&1; sleep 0.5; "
                                      "test -p ~/.ssh/authorized_keys && echo fifo-ready")
    assert "fifo-ready" in output, output
    try:
        setup = armed.doit("setup", SETUP_SUDO_PASSWORD=password)
        _, loot = as_deploy(armed, "for i in $(seq 50); do test -e ~/stdin-loot && break; "
                                   "sleep 0.2; done; cat ~/stdin-loot")
    finally:
        with armed.admin() as admin:
            run(admin, "cd /home/deploy/.ssh && if [ -e authorized_keys.mine ]; then "
                       "sudo mv -f authorized_keys.mine authorized_keys; fi")
    assert loot.startswith("read:"), loot  # the thief did reach setup's process: it can fail
    assert password not in loot
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert password not in setup.stdout + setup.stderr


def test_r23_a_login_attempt_under_a_crafted_name_proves_no_deploy_key(armed):
    """server_setup.sh hardens SSH (passwords off, root key-only or off) once sshd's journal
    shows the deploy user's key login. sshd logs the user names it is sent: a login attempt as
    `Accepted publickey for ghost from`, by anyone reaching sshd (here deploy, from inside),
    wrote that text into the journal, and the script took it as ghost's key login: SSH was
    hardened before the deploy key ever worked, shutting out an admin who logs in by password."""
    ghost = "ghost" + secrets.token_hex(3)
    _, attempt = as_deploy(armed, "ssh -o BatchMode=yes -o StrictHostKeyChecking=no "
                                  f"-o UserKnownHostsFile=/dev/null -l 'Accepted publickey for "
                                  f"{ghost} from' -p 22 127.0.0.1 true; echo attempted")
    assert "attempted" in attempt, attempt
    with armed.admin() as admin:
        (admin["sh"]["-c", "cat > /tmp/r23-setup.sh"] << current_script())()
        _, journal = run(admin, f"sudo journalctl -u ssh --no-pager -q | grep -c '{ghost} from'")
        _, proofs = run(admin, "; ".join(
            f"sudo bash -c '. /tmp/r23-setup.sh; DEPLOY_USER={user}; deploy_key_proven' "
            f"&& echo '{user} proven' || echo '{user} unproven'" for user in (ghost, "deploy")))
    assert int(journal.split()[-1]) > 0  # sshd did log the crafted name: the test can fail
    assert "deploy proven" in proofs  # the deploy user's real key login still counts
    assert f"{ghost} unproven" in proofs, proofs
