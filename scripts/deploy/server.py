"""One server as deploy steps see it: argv lists run over a single SSH shell session (one round
trip of a few milliseconds each), the server tool, and uploads. With DRY_RUN it prints every
command that would change something and runs only those that read (`reads=True`, and the
tool's read-only subcommands), so a plan is made from the server's real state."""

from __future__ import annotations

import atexit
import base64
import functools
import hashlib
import json
import select
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from scripts.errors import ToolkitError
from scripts.remote import Target, open_channel, open_session

TOOL_SOURCE = Path(__file__).with_name("server_tool.py")
PUT_CHUNK = 3 << 18  # 768 KiB of data, 1 MiB of base64 per shell line
# Server tool subcommands that change nothing: a dry run runs them.
# (health reads too, but a dry run starts no new release to check: callers say reads=True.)
READ_ONLY_TOOL = frozenset({"probe", "has-package", "history", "previous-good", "backups",
                            "disk", "plan", "verify"})
# The serve process's channel: one answer line is never longer (the tool's answers are small;
# what children print is cut to its tail there), and its greeting comes within this many bytes
# (a login script of the deploy user may print lines before the tool starts).
ANSWER_LIMIT = 16 << 20
GREETING = b'{"serving": true}\n'
GREETING_WITHIN = 64 << 10
# A parked serve process answers a call that reads nothing within this, or its link was cut.
PARKED_ANSWER_S = 5


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or [f"exit status {self.status}"])[-1].removeprefix("error: ")


# Connections a finished task left for the next task of this run (see Server.close), by target:
# (shell session, serve process or None, serve process not yet greeted or None).
_IDLE: dict[tuple, list] = {}


def _connection_key(target: Target) -> tuple:
    return (target.host, target.port, target.user, str(target.key_file),
            str(target.ssh_config), str(target.known_hosts_file))


def _end_serving(process: subprocess.Popen | None, wait: bool = True) -> None:
    """End a serve process: at the end of its input (it finishes the call under way), or at
    once when its channel is out of step."""
    if process is None:
        return
    try:
        process.stdin.close()
        if wait:
            process.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if process.poll() is None:
        process.kill()
    process.wait()


def _close_quietly(session, served, early=None, wait: bool = True) -> None:
    _end_serving(early, wait=False)
    _end_serving(served, wait)
    try:
        if not wait and session.proc is not None:
            session.proc.kill()  # at exit: the shell ends with its channel (plumbum's own
            session.proc.wait()  # close() sleeps 50 ms for its `exit` to be read)
        session.close()
    except Exception:  # noqa: BLE001 - a dead connection has nothing left to close
        pass


def _close_idle() -> None:
    """At exit: the tool processes end by themselves once their channel closes."""
    while _IDLE:
        for session, served, early in _IDLE.popitem()[1]:
            _close_quietly(session, served, early, wait=False)


def _greeted(process) -> bool:
    """Whether the serve process said it serves: its greeting, after whatever a login script
    printed first (read past, within GREETING_WITHIN bytes); False at the end of its output
    (no tool of this version there yet). A login script's last words may lack their newline
    and share the greeting's line."""
    budget = GREETING_WITHIN
    while budget > 0:
        line = process.stdout.readline(budget)
        if line.endswith(GREETING):
            return True
        if not line:
            return False
        budget -= len(line)
    return False


def _still_answers(process) -> bool:
    """Whether a parked serve process answers a call that reads nothing, in time. A link cut
    while it was parked would otherwise hold the next task's first command until ssh gives up
    (ServerAliveInterval, ~15 s) and then blame that command; a fresh connection says what
    is wrong in ssh's own words, or works if the link is back."""
    if process.poll() is not None:
        return False
    try:
        process.stdin.write(b'["disk"]\n')
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], PARKED_ANSWER_S)
    except OSError:
        return False
    return bool(ready) and isinstance(_answer(process.stdout.readline(ANSWER_LIMIT + 1)), Result)


def _answer(line: bytes) -> Result | str:
    """One answer line of the serve process as a Result, or what is wrong with it ("" for
    none: the channel closed)."""
    if not line:
        return ""
    if len(line) > ANSWER_LIMIT:
        return f"longer than {ANSWER_LIMIT >> 20} MiB"
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested beyond Python's stack
        return f"not JSON: {line[:80]!r}"
    fields = {"status": int, "stdout": str, "stderr": str}
    if not isinstance(answer, dict) or \
            not all(isinstance(answer.get(key), kind) for key, kind in fields.items()):
        return f"not status, stdout and stderr: {line[:80]!r}"
    return Result(answer["status"], answer["stdout"], answer["stderr"])


def tool_path(deploy_path: PurePosixPath) -> PurePosixPath:
    return deploy_path / ".deploy-tool" / f"server_tool-{_tool_digest()}.py"


def compiled_path(tool: PurePosixPath) -> PurePosixPath:
    """The tool's bytecode beside it: python3 never caches a script named on its command line,
    and compiling the tool's source costs each serve process ~30 ms of the server's CPU."""
    return tool.with_suffix(".pyc")


# Written by the server's own python3 (its bytecode is that interpreter's), atomically
# (py_compile writes aside and renames), with the source's mode; `dfile` names the source in a
# traceback.
COMPILE = "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], sys.argv[1], True)"


@functools.lru_cache(maxsize=1)  # read once a run, not once per task and server
def _tool_digest() -> str:
    return hashlib.sha256(TOOL_SOURCE.read_bytes()).hexdigest()[:12]


class Server:
    """A connected server. Use as a context manager; `name` labels its output lines."""

    def __init__(self, target: Target, deploy_path: PurePosixPath, dry_run: bool = False,
                 log=print):
        self.target = target
        self.name = target.display
        self.deploy_path = deploy_path
        self.dry_run = dry_run
        self.log = log
        self.session = None
        self.tool = tool_path(deploy_path)
        self.compiled = compiled_path(self.tool)
        self.tool_inline = False  # a dry run does not install the tool: it sends it with -c
        self._served = None  # the tool's `serve` process for this connection, once started
        self._early = None  # a serve process started with the connection, not yet greeted

    def __enter__(self) -> "Server":
        idle = _IDLE.get(_connection_key(self.target), [])
        while idle and self.session is None:  # the connection an earlier task of this run left
            session, served, early = idle.pop()
            if served is not None and not _still_answers(served):
                _close_quietly(session, served, early, wait=False)  # cut, or ended, while parked
            elif session.alive():
                self.session, self._served, self._early = session, served, early
            else:
                _close_quietly(session, served, early)
        if self.session is None:
            # The serve process starts first, so that the server starts it while it starts the
            # shell: both are ready about as soon as the shell alone would be.
            if not self.dry_run:
                self._early = open_channel(self.target, self._serve_command())
            try:
                self.session = open_session(self.target)
            except BaseException:
                self._early, early = None, self._early
                _end_serving(early, wait=False)
                raise
        self._in_step = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reconnect(self) -> None:
        self._in_step = False  # whatever was under way left it out of step
        self.close()
        self.__enter__()

    def close(self) -> None:
        """Done with the connection: kept for the next task of this run (`doit deploy` runs
        setup, target, check, ship and verify; each would open a shell and start the tool
        again), unless a call was cut off mid-way; every kept one is closed at exit."""
        session, served, early = self.session, self._served, self._early
        self.session, self._served, self._early = None, None, None
        if session is None:
            return
        if self._in_step and session.alive():
            if not _IDLE:
                atexit.register(_close_idle)
            _IDLE.setdefault(_connection_key(self.target), []).append((session, served, early))
            return
        _close_quietly(session, served, early)

    # -- running ----------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, what: str = "",
            reads: bool = False) -> Result:
        """Run argv; `reads`: it changes nothing, so a dry run runs it too."""
        command = " ".join(shlex.quote(str(arg)) for arg in argv)
        if self.dry_run and not reads:
            self.log(f"    $ {command}")
            return Result(0, "{}", "")
        status, stdout, stderr = self._session_run(command, what or argv[0])
        result = Result(status, stdout, stderr)
        if check and status != 0:
            raise ToolkitError(f"{self.name}: {what or argv[0]} failed: {result.error_line}")
        return result

    def _session_run(self, command: str, what: str) -> tuple[int, str, str]:
        try:
            return self.session.run(command, retcode=None)
        except BaseException as error:
            from plumbum.machines.session import ShellSessionError  # loaded with the session

            self._in_step = False  # Ctrl-C or a lost link mid-command: never hand it on
            if not isinstance(error, (ShellSessionError, EOFError, OSError)):
                raise
            # SSHCommsError is an EOFError
            raise ToolkitError(f"{self.name}: the SSH connection was lost during {what} "
                               f"({type(error).__name__}); nothing after it ran") from None

    def tool_call(self, subcommand: str, *args: str, what: str = "",
                  reads: bool | None = None) -> dict:
        """Run a server_tool subcommand; its JSON answer, or a ToolkitError with its error."""
        argv = [subcommand, *map(str, args)]
        served = None if self.dry_run or self.tool_inline else self._serve()
        if served is not None:
            result = self._served_call(served, argv, what or subcommand)
        else:
            tool = ["-c", TOOL_SOURCE.read_text()] if self.tool_inline else [str(self.tool)]
            result = self.run(["python3", "-I", "-S", *tool, *argv], what=what or subcommand,
                              reads=subcommand in READ_ONLY_TOOL if reads is None else reads)
        try:
            return json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout else {}
        except (ValueError, IndexError, RecursionError):
            raise ToolkitError(f"{self.name}: {subcommand}: unexpected answer "
                               f"{result.stdout[:200]!r}") from None

    def _serve_command(self) -> str:
        return shlex.join(["python3", "-I", "-S", str(self.compiled), "serve"])

    def _serve(self):
        """The server tool's `serve` process (one python3 for every call of this connection):
        the one started with the connection, or one started now; None while the tool is not
        installed (calls then run one python3 each, as before ensure_tool)."""
        if self._served is None:
            early, self._early = self._early, None
            if early is not None:  # started before ensure_tool may have installed the tool
                self._served = self._greeted_or_ended(early)
            if self._served is None:
                self._served = self._greeted_or_ended(
                    open_channel(self.target, self._serve_command()))
        return self._served

    @staticmethod
    def _greeted_or_ended(process):
        try:
            greeted = _greeted(process)
        except BaseException:  # Ctrl-C while it starts
            _end_serving(process, wait=False)
            raise
        if greeted:
            return process
        _end_serving(process, wait=False)
        return None

    def _served_call(self, process, argv: list[str], what: str) -> Result:
        try:
            process.stdin.write(json.dumps(argv).encode() + b"\n")
            process.stdin.flush()
            answer = _answer(process.stdout.readline(ANSWER_LIMIT + 1))
        except OSError:
            answer = None
        except BaseException:  # Ctrl-C or SIGTERM mid-call: its answer would answer the next
            self._stop_serving(wait=False)
            raise
        if not isinstance(answer, Result):
            self._stop_serving(wait=False)
            if answer:  # never read on: the next line could be this call's real answer
                raise ToolkitError(f"{self.name}: {what}: the server answered something other "
                                   f"than the server tool ({answer}); nothing after it ran")
            raise ToolkitError(f"{self.name}: the SSH connection was lost during {what}; "
                               f"nothing after it ran")
        if answer.status != 0:
            raise ToolkitError(f"{self.name}: {what} failed: {answer.error_line}")
        return answer

    def _stop_serving(self, wait: bool = True) -> None:
        """This connection's serve process ended (see _end_serving)."""
        process, self._served = self._served, None
        _end_serving(process, wait)

    def sudo(self, argv: list[str], check: bool = True, what: str = "",
             reads: bool = False) -> Result:
        return self.run(["sudo", "-n", *argv], check=check, what=what, reads=reads)

    def put(self, data: bytes, remote_path: PurePosixPath) -> None:
        """Write bytes to a file on the server through the open shell session (base64 text in
        chunks): no second SSH handshake, which would cost more than the transfer."""
        target = shlex.quote(str(remote_path))
        if self.dry_run:
            self.log(f"    $ base64 -d > {target}  # {len(data)} bytes, in chunks")
            return
        # printf is a shell builtin: the data never shows in a process list; umask 077 keeps
        # the file private while it is written.
        status, _, stderr = self._session_run(f"(umask 077; : > {target})", "the upload")
        for start in range(0, len(data), PUT_CHUNK):
            if status != 0:
                break
            chunk = base64.b64encode(data[start:start + PUT_CHUNK]).decode()
            status, _, stderr = self._session_run(
                f"printf %s {chunk} | base64 -d >> {target}", "the upload")
            if status != 0:
                raise ToolkitError(f"{self.name}: writing {remote_path} failed: {stderr.strip()}")

    def ensure_tool(self) -> bool:
        """Install this version of the server tool and its bytecode; False when DEPLOY_PATH is
        missing."""
        if self._served is not None:
            return True  # an earlier task of this run installed it, or found it installed
        tried = self._early is not None
        if tried:  # the serve process started with the connection
            early, self._early = self._early, None
            self._served = self._greeted_or_ended(early)
            if self._served is not None:
                return True  # it greeted: this version of the tool is installed
        if self.run(["test", "-f", str(self.tool)], check=False, reads=True).status == 0:
            if tried:  # installed, yet its bytecode did not serve: missing, or written by
                self._compile_tool()  # another python3 (the server's was upgraded)
            return True
        if self.run(["test", "-d", str(self.deploy_path / "releases")], check=False,
                    reads=True).status:
            return False
        if self.dry_run:
            self.tool_inline = True
            return True
        self.run(["mkdir", "-p", str(self.tool.parent)])
        # Written aside, then renamed: a connection cut mid-write never leaves a partial tool
        # under the name that `test -f` above takes for installed.
        staged = self.tool.with_name(self.tool.name + ".partial")
        self.put(TOOL_SOURCE.read_bytes(), staged)
        self.run(["chmod", "0644", str(staged)])  # the scheduled backup runs it as the app user
        self.run(["mv", "-f", str(staged), str(self.tool)])
        self._compile_tool()
        # server_tool.py, the name the backup timer runs, follows the newest version.
        stable = self.tool.with_name("server_tool.py")
        self.run(["ln", "-sfn", self.tool.name, f"{stable}.new"])
        self.run(["mv", "-fT", f"{stable}.new", str(stable)])
        return True

    def _compile_tool(self) -> None:
        """Unchecked: without bytecode the calls run the source, one python3 each (slower, as
        before the tool was installed), so a deploy never fails for the want of it."""
        self.run(["python3", "-I", "-S", "-c", COMPILE, str(self.tool), str(self.compiled)],
                 check=False, what="compiling the server tool")
