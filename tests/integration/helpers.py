"""Helpers for integration tests: run doit against a sandbox, probe ports from outside."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from scripts.settings import REPO_ROOT

DOIT = [sys.executable, "-m", "doit", "-f", str(REPO_ROOT / "dodo.py")]


def doit_env(sandbox_dir: Path, **settings: str) -> dict:
    """The environment of a doit run against the sandbox in sandbox_dir, ignoring any .env
    and any DEPLOY_SERVER of the caller's (unless settings give one)."""
    env = {key: value for key, value in os.environ.items() if key != "DEPLOY_SERVER"}
    env.update({"ENV_FILE": os.devnull, "SANDBOX_DIR": str(sandbox_dir),
                "PYTHONPATH": str(REPO_ROOT), **settings})
    return env


def doit(work_dir: Path, sandbox_dir: Path, *args: str, timeout: int = 600,
         **settings: str) -> subprocess.CompletedProcess:
    """Run a doit task as a user would, and wait for it."""
    return subprocess.run([*DOIT, "--dir", str(work_dir), *args], capture_output=True,
                          text=True, env=doit_env(sandbox_dir, **settings), timeout=timeout)


def script_lines(output: str) -> list[str]:
    """The step lines server_setup.sh printed."""
    return [line for line in output.splitlines()
            if line.startswith(("ok:", "changed:", "would change:"))]


PROBE_HOST = "192.0.2.1"   # TEST-NET-1, only inside the namespaces made here
SERVER_ADDRESS = "192.0.2.2"


@contextmanager
def outside_probe(init_pid: int):
    """A network namespace made for the test, wired to the server by a veth pair, so traffic
    really crosses the server's firewall (loopback traffic would not). Yields a function that
    says for each port: open, refused or filtered."""
    namespace = f"fhdprobe{os.getpid()}"
    host_side, server_side = f"vp{os.getpid()}", f"vs{os.getpid()}"
    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", namespace)
    try:
        run("ip", "link", "add", host_side, "netns", namespace, "type", "veth", "peer", "name",
            server_side, "netns", str(init_pid))
        run("ip", "-n", namespace, "addr", "add", f"{PROBE_HOST}/24", "dev", host_side)
        run("ip", "-n", namespace, "link", "set", host_side, "up")
        run("nsenter", "-t", str(init_pid), "-n", "ip", "addr", "add", f"{SERVER_ADDRESS}/24",
            "dev", server_side)
        run("nsenter", "-t", str(init_pid), "-n", "ip", "link", "set", server_side, "up")

        def probe(ports: list[int]) -> dict[int, str]:
            code = ("import socket,sys\n"
                    "for port in map(int, sys.argv[1:]):\n"
                    "    s = socket.socket(); s.settimeout(1.5)\n"
                    "    try: s.connect((%r, port)); state = 'open'\n"
                    "    except ConnectionRefusedError: state = 'refused'\n"
                    "    except OSError: state = 'filtered'\n"
                    "    print(port, state); s.close()\n" % SERVER_ADDRESS)
            output = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", code,
                                     *map(str, ports)], capture_output=True, text=True,
                                    check=True, timeout=60).stdout
            return {int(port): state for port, state in
                    (line.split() for line in output.splitlines())}

        yield probe
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["nsenter", "-t", str(init_pid), "-n", "ip", "link", "del", server_side],
                       capture_output=True)


def health_answers_503(views: str) -> str:
    """An edit of the bundled app's helpdesk/views.py: its health check answers 503, what a
    starting app may answer (waited out for HEALTH_TIMEOUT_S)."""
    return views.replace('return jsonify(status="ok"',
                         'return jsonify(status="bad"), 503\n    return jsonify(status="ok"')
