"""The deploying side of the server tool's `serve` channel (Server._serve, _served_call), with
the channel's far end run here as a local process: the real tool, the real tool behind a login
script that prints, or a hostile server's answers. Real servers: tests/integration."""

from __future__ import annotations

import importlib.util
import json
import py_compile
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import pytest

from scripts.deploy import server as server_module
from scripts.deploy.server import ANSWER_LIMIT, TOOL_SOURCE, Server
from scripts.errors import ToolkitError
from scripts.remote import Target


@pytest.fixture
def far_end(tmp_path, monkeypatch):
    """A Server whose serve channel runs `PREFIX; <the serve command>` in a local sh (set
    far_end.prefix), with the tool installed under tmp_path as ensure_tool would."""
    server = Server(Target("here", 22, "deploy"), PurePosixPath(tmp_path / "app"))
    Path(server.tool).parent.mkdir(parents=True)
    shutil.copy(TOOL_SOURCE, server.tool)
    py_compile.compile(str(server.tool), str(server.compiled), doraise=True)
    started = []

    def open_channel(target, command):
        command = command.replace("python3", sys.executable, 1)
        process = subprocess.Popen(["sh", "-c", f"{server.prefix}\n{command}"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(process)
        return process
    monkeypatch.setattr(server_module, "open_channel", open_channel)
    server.prefix, server.started = ":", started
    yield server
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_login_script_printing_before_the_tool_starts_does_not_shift_the_answers(
        far_end, tmp_path):
    """bash reads the deploy user's ~/.bashrc for `ssh host command`: lines printed there come
    first on the channel, one without its newline on the greeting's own line."""
    far_end.prefix = "echo 'Welcome to the server'; printf 'last login'"
    (tmp_path / "app" / "releases").mkdir()
    first = far_end.tool_call("disk", str(tmp_path))
    second = far_end.tool_call("probe", str(tmp_path / "app"))
    assert list(first) == ["free_mb"] and first["free_mb"][str(tmp_path)] > 0
    assert second["layout"] is False and "releases" in second
    assert len(far_end.started) == 1  # one serve process answered both


class LocalShell:
    """The connection's shell session, as a local sh: ensure_tool's commands really run."""
    proc = None

    def __init__(self):
        self.commands = []

    def run(self, command, retcode=None):
        self.commands.append(command)
        if command.startswith("python3 "):
            command = shlex.quote(sys.executable) + command.removeprefix("python3")
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
        return done.returncode, done.stdout, done.stderr

    def alive(self):
        return True


def installing(far_end):
    """far_end with nothing installed yet, its serve process started with the connection
    (as __enter__ starts it), and a local shell for ensure_tool's commands."""
    Path(far_end.tool).unlink()
    Path(far_end.compiled).unlink()
    (Path(far_end.deploy_path) / "releases").mkdir()
    far_end.session = LocalShell()
    far_end._early = server_module.open_channel(far_end.target, far_end._serve_command())
    return far_end


def test_the_tool_is_installed_with_its_bytecode_and_served_from_it(far_end, tmp_path):
    """python3 compiles a script named on its command line on every start (~30 ms of the
    server's CPU each): the serve process runs bytecode the server's python3 wrote once."""
    server = installing(far_end)
    assert server.ensure_tool()
    compiled = Path(server.compiled)
    assert compiled.read_bytes()[:4] == importlib.util.MAGIC_NUMBER
    assert compiled.stat().st_mode & 0o777 == 0o644  # as the source: the app user reads it
    assert server.tool_call("disk", str(tmp_path))["free_mb"][str(tmp_path)] > 0
    # The early serve process found no tool; the one that answered runs the bytecode.
    assert len(server.started) == 2 and server._served is server.started[1]
    assert str(server.compiled) in server._serve_command()
    assert not any(str(server.tool) in command and command.startswith("python3 -I -S /")
                   for command in server.session.commands)  # no call ran the source


def test_bytecode_of_another_python_is_compiled_again_and_served(far_end, tmp_path):
    """The server's python3 upgraded since the tool was installed: its old bytecode does not
    load, so it is written again and the run still has its one serve process."""
    server = installing(far_end)
    server.ensure_tool()
    server._stop_serving()
    compiled = Path(server.compiled)
    compiled.write_bytes(b"\0\0\r\n" + compiled.read_bytes()[4:])  # no Python's magic
    server._early = server_module.open_channel(server.target, server._serve_command())
    assert server.ensure_tool()
    assert compiled.read_bytes()[:4] == importlib.util.MAGIC_NUMBER
    assert server.tool_call("probe", str(server.deploy_path))["layout"] is False
    assert server._served is server.started[-1] and server.started[-2].poll() is not None
    assert sum("py_compile" in command for command in server.session.commands) == 2


HOSTILE = r"""
import sys
print('{"serving": true}', flush=True)
for line in sys.stdin:
    sys.stdout.write(ANSWER)
    sys.stdout.flush()
"""


@pytest.mark.parametrize("answer, said", [
    ('"[]\\n"', "not status, stdout and stderr"),
    ('\'{"status": "0", "stdout": "{}", "stderr": ""}\\n\'', "not status, stdout and stderr"),
    ('"<html>\\n"', "not JSON"),
    ('"[" * 100000 + "]" * 100000 + "\\n"', "not JSON"),
    ('"x" * (ANSWER_LIMIT + 10)', f"longer than {ANSWER_LIMIT >> 20} MiB"),
])
def test_an_answer_that_is_not_the_tools_is_one_line_and_ends_the_channel(
        far_end, tmp_path, answer, said):
    """A hostile (or broken) far end: one ToolkitError naming the call, never a traceback or
    an unbounded read, and the channel is never read on (its next line could answer the
    next call)."""
    script = tmp_path / "hostile.py"
    script.write_text(f"ANSWER_LIMIT = {ANSWER_LIMIT}\nANSWER = {answer}\n{HOSTILE}")
    far_end.prefix = f"exec {sys.executable} {script}"
    with pytest.raises(ToolkitError) as raised:
        far_end.tool_call("probe", "/nowhere", what="reading the server")
    assert str(raised.value).startswith(
        "here: reading the server: the server answered something other")
    assert said in str(raised.value) and "nothing after it ran" in str(raised.value)
    assert far_end._served is None and far_end.started[0].poll() is not None


def test_a_tool_answer_nested_past_pythons_stack_is_one_line(far_end, tmp_path):
    """The answer's own JSON (stdout's last line) nested 100000 deep: json raises
    RecursionError, not ValueError."""
    script = tmp_path / "nested.py"
    script.write_text(f"import json\nANSWER = json.dumps({{'status': 0, 'stdout': '[' * 100000, "
                      f"'stderr': ''}}) + '\\n'\n{HOSTILE}")
    far_end.prefix = f"exec {sys.executable} {script}"
    with pytest.raises(ToolkitError, match=r"^here: probe: unexpected answer '\[\[\["):
        far_end.tool_call("probe", "/nowhere")


class LiveShell:
    proc = None

    def alive(self):
        return True

    def close(self):
        pass


def parked(far_end, monkeypatch) -> subprocess.Popen:
    """far_end's serve process, parked by close() as a task's end does; the next task's
    fresh shell is a LiveShell."""
    process = far_end._served
    far_end.session, far_end._in_step = LiveShell(), True
    monkeypatch.setattr(server_module, "_IDLE", {})
    monkeypatch.setattr(server_module, "open_session", lambda target: LiveShell())
    far_end.close()
    return process


def test_a_serve_process_that_ended_while_parked_is_replaced_by_the_next_task(
        far_end, tmp_path, monkeypatch):
    """A task parks its connection for the next; the serve process may end meanwhile (killed
    on the server): the next task starts another, and its call succeeds."""
    far_end.tool_call("disk", str(tmp_path))
    process = parked(far_end, monkeypatch)
    process.kill()
    process.wait()
    far_end.__enter__()
    assert far_end.tool_call("disk", str(tmp_path))["free_mb"][str(tmp_path)] > 0
    assert len(far_end.started) == 2


def test_a_parked_connection_that_no_longer_answers_is_replaced_in_bounded_time(
        far_end, tmp_path, monkeypatch):
    """A link cut between two tasks of one run: the parked serve process gets no answer
    through. The next task does not send its first command into it (that would wait for
    ssh's keepalives, ~15 s, then blame the command): it opens a fresh connection."""
    script = tmp_path / "frozen.py"
    script.write_text("import sys, time\nprint('{\"serving\": true}', flush=True)\n"
                      "sys.stdin.readline()\nprint(json_answer, flush=True)\n"
                      "sys.stdin.readline()\ntime.sleep(60)\n".replace(
                          "json_answer", repr('{"status": 0, "stdout": "{}", "stderr": ""}')))
    far_end.prefix = f"exec {sys.executable} {script}"
    far_end.tool_call("disk", str(tmp_path))  # answered; the link is cut after it
    process = parked(far_end, monkeypatch)
    monkeypatch.setattr(server_module, "PARKED_ANSWER_S", 0.5)
    started = time.monotonic()
    far_end.__enter__()
    assert time.monotonic() - started < 5
    assert far_end._served is None and process.poll() is not None
    assert not any(server_module._IDLE.values())


def test_serve_sends_only_the_tail_of_what_a_child_printed(tmp_path):
    """A child writing megabytes (here `python -m venv`, steered by the deploy user's own
    PYTHONPATH, which the tool's -I ignores but its children read) must not make an answer
    line the deploying machine refuses; its last words stay."""
    root = tmp_path / "app"
    for folder in ("releases/r1", "shared/venvs"):
        (root / folder).mkdir(parents=True)
    (root / "releases" / "r1" / "manifest.json").write_text(json.dumps(
        {"release_id": "r1", "requirements_sha256": "r", "wheels": []}))
    (tmp_path / "fake" / "venv").mkdir(parents=True)
    (tmp_path / "fake" / "venv" / "__main__.py").write_text(
        "import sys\nsys.stdout.write('x' * 5000000 + '\\nthe last words\\n')\nsys.exit(3)\n")
    (tmp_path / "fake" / "venv" / "__init__.py").write_text("")
    process = subprocess.Popen([sys.executable, "-I", "-S", str(TOOL_SOURCE), "serve"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env={"PYTHONPATH": str(tmp_path / "fake"), "PATH": "/usr/bin:/bin"})
    process.stdout.readline()
    process.stdin.write(json.dumps(["venv", str(root), "r1"]).encode() + b"\n")
    process.stdin.flush()
    line = process.stdout.readline()
    process.stdin.close()
    process.wait(timeout=30)
    answer = json.loads(line)
    assert answer["status"] == 2 and "the last words" in answer["stderr"]
    assert len(line) < 200_000
