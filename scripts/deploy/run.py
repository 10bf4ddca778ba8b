"""`doit run -- COMMAND`: one command in the live release on a server, as the app user, with the
app's environment, its venv on PATH and the release as working directory.

The deploy user runs root's runner with sudo (conf/app-run.py): it starts the command with
`systemd-run` in the service's own sandbox, never as root and never outside it. With a terminal
here, ssh gets one (-t) and so does the command (--pty): `doit run -- flask --app wsgi shell`
is interactive. Otherwise plain pipes (CI). The exit status is the command's."""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from typing import IO

from scripts.deploy.hooks import runner
from scripts.remote import Target, check_key_file, ssh_argv
from scripts.settings import Settings

# The runner is missing or not allowed: a server set up before `doit run` existed.
NOT_SET_UP = 125


def remote_command(settings: Settings, command: list[str], tty: bool) -> str:
    """The shell line the deploy user's login shell runs on the server."""
    tool = runner(settings)
    words = " ".join(shlex.quote(word) for word in command)
    mode = "--pty" if tty else "--pipe"
    return (f"if sudo -n -l {tool} >/dev/null 2>&1; then exec sudo -n {tool} {mode} current -- "
            f"{words}; fi; echo 'error: this server has no {tool} that the deploy user may run; "
            f"run `doit setup` (it installs the runner and its sudo rule)' >&2; "
            f"exit {NOT_SET_UP}")


def ssh_command(target: Target, settings: Settings, command: list[str], tty: bool) -> list[str]:
    # With a terminal, ssh would add "Connection to … closed." to the command's output.
    extra = ("-t", "-o", "LogLevel=ERROR") if tty else ("-T",)
    return [*ssh_argv(target, *extra), remote_command(settings, command, tty)]


def run_here(target: Target, settings: Settings, command: list[str], tty: bool,
             prefix: str = "", stdin=None) -> int:
    """Run it on one server; its output here (each line prefixed, if asked); its status."""
    if target.key_file is not None:
        check_key_file(target.key_file, target.key_setting)
    argv = ssh_command(target, settings, command, tty)
    if not prefix:
        return subprocess.run(argv, stdin=stdin).returncode
    process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    copies = [threading.Thread(target=_prefixed, args=(source, sink, prefix))
              for source, sink in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))]
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.join()
    return process.wait()


def _prefixed(source: IO[bytes], sink: IO[str], prefix: str) -> None:
    for line in iter(source.readline, b""):
        sink.write(prefix + line.decode(errors="replace"))
        sink.flush()
