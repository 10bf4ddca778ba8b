#!/usr/bin/python3 -IS
# Installed by server_setup.sh as /usr/local/sbin/@SERVICE_NAME@-run (root, 0755); the deploy
# user runs it with sudo (conf/sudoers) for `doit run` and the app's deploy hooks.
#
# It starts one command as @APP_USER@ in the app's own sandbox: `systemd-run` with the very
# hardening of @SERVICE_NAME@.service (embedded below when setup rendered this file, never read
# from a path the deploy user or the app can write), the app's environment, its venv on PATH and
# a release folder as working directory. The deploy user chooses the command, as it chooses the
# app's code; it chooses nothing else: not the user, not a property, not a path root opens.
#
#   @SERVICE_NAME@-run --pty|--pipe current|RELEASE -- COMMAND [ARG...]
#
# current: the live release (`doit run`); RELEASE: releases/RELEASE, the one being deployed (its
# deploy hooks). Root opens neither: systemd enters the folder as the app user.
# --pty: a terminal in the sandbox (ssh -t); --pipe: plain stdin/stdout/stderr. The exit status
# is the command's.
import os
import pwd
import re
import sys

APP_USER = "@APP_USER@"
DEPLOY_PATH = "@DEPLOY_PATH@"
ENV_FILE = "/etc/@SERVICE_NAME@/app.env"
LOG_PATH = "@LOG_PATH@"
HARDENING = """
@HARDENING@
"""
USAGE = "usage: @SERVICE_NAME@-run --pty|--pipe current|RELEASE -- COMMAND [ARG...]"
RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a name, never a path


def properties(text: str) -> list[str]:
    """The unit's hardening lines as systemd-run properties (comments and blanks dropped)."""
    lines = (line.strip() for line in text.splitlines())
    return [f"--property={line}" for line in lines if line and not line.startswith("#")]


def literal(arg: str) -> str:
    """systemd expands $NAME in a command line; $$ is its literal dollar sign."""
    return arg.replace("$", "$$")


def argv_for(mode: str, release: str, command: list[str], uid: int, gid: int) -> list[str]:
    folder = f"{DEPLOY_PATH}/current" if release == "current" else \
        f"{DEPLOY_PATH}/releases/{release}"
    return ["/usr/bin/systemd-run", "--quiet", "--collect", "--wait", mode,
            "--service-type=exec", f"--description=@SERVICE_NAME@-run in {folder}",
            f"--uid={uid}", f"--gid={gid}", f"--working-directory={folder}",
            # Read by systemd as root, as for the service: a file in a folder only root writes.
            f"--property=EnvironmentFile=-{ENV_FILE}",
            f"--setenv=APP_LOG_DIR={LOG_PATH}",
            f"--setenv=PATH={folder}/.venv/bin:/usr/bin:/bin",
            *properties(HARDENING),
            # env finds the command on PATH as the app user, inside the sandbox.
            "--", "/usr/bin/env", "--", *map(literal, command)]


def main(args: list[str]) -> int:
    if len(args) < 4 or args[0] not in ("--pty", "--pipe") \
            or not RELEASE.fullmatch(args[1]) or args[2] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        user = pwd.getpwnam(APP_USER)
    except KeyError:
        print(f"error: the app user {APP_USER} does not exist", file=sys.stderr)
        return 2
    if user.pw_uid == 0 or user.pw_gid == 0:
        print(f"error: refusing to run as root: the app user {APP_USER} is root",
              file=sys.stderr)
        return 2
    command = args[3:]
    os.execv("/usr/bin/systemd-run", argv_for(args[0], args[1], command, user.pw_uid,
                                               user.pw_gid))
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
