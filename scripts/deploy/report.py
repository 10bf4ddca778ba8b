"""Output a person can follow: one line per step with `changed` or `ok`, its time and what it
did; a summary at the end. Every line names the server when there are several."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


_OUTPUT = threading.Lock()


def print_line(text: str, stream=None) -> None:
    """TEXT and its newline in one write: servers report from threads side by side, and
    print() writes the two separately, so two servers' lines could run into one."""
    stream = stream or sys.stdout
    with _OUTPUT:
        stream.write(text + "\n")
        stream.flush()


@dataclass
class StepOutcome:
    changed: bool = False
    detail: str = ""
    seconds: float | None = None  # the server's own timing, when one call did several steps


@dataclass
class Reporter:
    server: str = ""
    show_server: bool = False
    log: object = print_line
    steps: list[tuple[str, StepOutcome, float]] = field(default_factory=list)
    failed_step: str = ""
    dry_run: bool = False
    # Failures reported after the release went live and kept it (a post-switch hook with
    # AUTO_ROLLBACK=0): the run ends with an error once every step is done.
    late_failures: list[str] = field(default_factory=list)

    def verdict(self, changed: bool) -> str:
        """`changed` or `ok`; a dry run says what a real run would."""
        return ("would change" if self.dry_run else "changed") if changed else "ok"

    def line(self, text: str) -> None:
        prefix = f"{self.server}: " if self.show_server else ""
        self.log(f"{prefix}{text}")

    def warning(self, text: str) -> None:
        """`warning: …` on stderr, where CI logs and people look for what went wrong."""
        prefix = f"{self.server}: " if self.show_server else ""
        print_line(f"{prefix}warning: {text}", sys.stderr)

    @contextmanager
    def step(self, name: str):
        """`with reporter.step("upload") as outcome: ...; outcome.changed = True`"""
        outcome = StepOutcome()
        started = time.monotonic()
        try:
            yield outcome
        except BaseException:
            self.failed_step = name
            self.line(f"{'FAILED':8} {name:10} {time.monotonic() - started:5.2f} s")
            raise
        elapsed = time.monotonic() - started if outcome.seconds is None else outcome.seconds
        self.steps.append((name, outcome, elapsed))
        self.line(f"{self.verdict(outcome.changed):8} {name:10} {elapsed:5.2f} s  "
                  f"{outcome.detail}".rstrip())

    @property
    def changed(self) -> int:
        return sum(1 for _, outcome, _ in self.steps if outcome.changed)
