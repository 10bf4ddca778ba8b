"""`python -m scripts.sandbox up|down|status [-n N]`: the same as `doit sandbox`, for scripts
(such as the CI cleanup trap) that must not depend on doit's state."""

from __future__ import annotations

import argparse
import sys

from scripts.errors import ToolkitError
from scripts.sandbox import sandbox_from_settings
from scripts.sandbox.commands import run_command
from scripts.settings import load_settings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.sandbox")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("-n", "--servers", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        return run_command(sandbox_from_settings(settings), args.command,
                           args.servers or settings.sandbox_servers)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
