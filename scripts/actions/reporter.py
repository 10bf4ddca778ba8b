"""doit's console output without doit's failure report for our actions: they have already
printed one `error:` line naming the cause, and doit's own `Python Task failed: '<function …>'
returned False` would only bury it. Failures doit finds itself (a task that does not exist, a
dependency cycle) are still reported as doit reports them."""

from __future__ import annotations

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter


class ReportedFailure(TaskFailed):
    """A task failure whose cause the action has already printed."""

    def __init__(self):
        super().__init__("reported above")


class ToolkitReporter(ConsoleReporter):
    desc = "console output; failures reported once, by the task itself"

    def add_failure(self, task, fail):
        if isinstance(fail, ReportedFailure):
            return
        super().add_failure(task, fail)
