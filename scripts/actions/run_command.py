"""`doit run [--server NAME] -- COMMAND [ARG...]`: a command in the live release on the
server(s) (scripts/deploy/run.py). doit's own `run` command (`doit run TASK`, and every plain
`doit TASK`) is unchanged: only a command line with `--` is taken for a command to run.

doit.cfg registers this class as doit's `run` command (doit itself names tasks after `run`,
so no task could be called that)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from doit.cmd_run import Run as DoitRun
from doit.exceptions import InvalidCommand

from scripts.errors import ToolkitError

USAGE = "doit run [--server NAME] -- COMMAND [ARG...]"


class Run(DoitRun):
    doc_purpose = f"run tasks; or `{USAGE}`: a command in the live release on the server(s)"

    def parse_execute(self, in_args):
        if "--" not in in_args:
            try:
                return super().parse_execute(in_args)
            except InvalidCommand as error:
                # `doit run flask …`: doit's own answer ("Must be a task, or a target") does not
                # say that a command for the server goes after `--`.
                if error.not_found is None or sys.argv[1:2] != ["run"]:
                    raise
                print(f"error: {error.not_found} is not a task; a command for the server goes "
                      f"after `--`: doit run -- {shlex.join(sys.argv[2:])}", file=sys.stderr)
                return 3
        # doit took every NAME=value word for a variable of its own and dropped it (`sh -c
        # 'x=1; …'`): the command is read from the command line as it was typed.
        typed = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
        return run_command(in_args[:in_args.index("--")], typed)


def run_command(options: list[str], command: list[str]) -> int:
    """The command's exit status (on several servers: the first that failed), or 1 with one
    `error:` line."""
    parser = argparse.ArgumentParser(prog="doit run", usage=USAGE, add_help=False)
    parser.add_argument("--server", default="")
    try:
        known, unknown = parser.parse_known_args(options)
        if unknown or not command:
            raise ToolkitError(f"usage: {USAGE} (for example: doit run -- flask --app wsgi "
                               f"shell)")
        return _run(known.server, command)
    except ToolkitError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1


def _run(server_name: str, command: list[str]) -> int:
    from scripts.deploy.run import run_here, ssh_command
    from scripts.settings import load_settings
    from scripts.targets import deploy_targets

    settings = load_settings()
    targets = deploy_targets(settings)
    if server_name:
        chosen = [t for t in targets if server_name in (t.display, t.host)]
        if not chosen:
            raise ToolkitError(f"--server {server_name}: not one of the servers "
                               f"({', '.join(t.display for t in targets)})")
        targets = chosen
    several = len(targets) > 1
    # A terminal for the command only when one server gets it: several run one after another,
    # each line prefixed with its server, and none reads this terminal.
    tty = not several and sys.stdin.isatty() and sys.stdout.isatty()
    failed: list[tuple[str, int]] = []
    for target in targets:
        if settings.dry_run:
            print(f"DRY_RUN=1: {target.display}: would run "
                  f"{subprocess.list2cmdline(ssh_command(target, settings, command, tty))}")
            continue
        status = run_here(target, settings, command, tty,
                          prefix=f"{target.display}: " if several else "",
                          stdin=subprocess.DEVNULL if several else None)
        if status != 0:
            failed.append((target.display, status))
    if several and failed:
        print("error: the command failed on " + ", ".join(
            f"{name} (exit {status})" for name, status in failed), file=sys.stderr)
    return failed[0][1] if failed else 0
