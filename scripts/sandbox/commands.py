"""What `doit sandbox [up|down|status]` prints and returns, shared by doit and the module CLI."""

from __future__ import annotations

import time

from scripts.sandbox import Sandbox, describe


def run_command(sandbox: Sandbox, command: str, count: int) -> int:
    started = time.monotonic()
    if command == "up":
        before = {s.name for s in sandbox.servers()}
        servers = sandbox.up(count)
        for server in servers:
            verdict = "ok" if server.name in before else "changed"
            print(f"{verdict}: {describe(server, sandbox)}")
        print(f"sandbox: {len(servers)} server(s) up in {time.monotonic() - started:.1f} s; "
              f"details in {sandbox.state_file}")
    elif command == "down":
        stopped = sandbox.down()
        for name in stopped:
            print(f"changed: {name} stopped and removed")
        if not stopped:
            print("ok: no sandbox server was running")
    else:
        servers = sandbox.servers()
        for server in servers:
            health = "healthy" if sandbox.is_healthy(server) else "NOT RESPONDING"
            print(f"{health}: {describe(server, sandbox)}")
        if not servers:
            print("no sandbox server; start one with `doit sandbox`")
    return 0
