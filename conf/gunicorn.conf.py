# Installed by server_setup.sh as /etc/@SERVICE_NAME@/gunicorn.conf.py
# Under systemd the listening socket comes from @SERVICE_NAME@.socket; bind is the fallback.
bind = "127.0.0.1:@APP_PORT@"
workers = @WORKERS@
# The master imports the app once and the workers fork from it: a start costs one import,
# not one per worker, and the workers share that memory. An app that fails to import makes
# `systemctl restart` itself fail, so a deploy sees it at once. (HUP reloads keep the preloaded
# code: releases are switched by the hand-over below, or by a restart.)
preload_app = True
# Releases are switched by the hand-over or systemd; no control socket (and no thread for it).
control_socket_disable = True
timeout = 30
graceful_timeout = 20
keepalive = 5
errorlog = "-"  # journald: journalctl -u @SERVICE_NAME@
loglevel = "info"

# The write gate: while a deploy backs up and migrates the database (or `doit restore` runs), it
# holds an exclusive lock on this file. Each request takes a shared lock first, so requests wait
# here (they are never refused) and none writes between the backup and the migration's end:
# restoring that backup after a failed migration undoes nothing the app acknowledged. The lock
# dies with the process that holds it, so a killed deploy never leaves requests waiting.
WRITE_GATE = "@DEPLOY_PATH@/shared/write-gate"


def pre_request(worker, req):
    import fcntl
    import os
    try:
        gate = os.open(WRITE_GATE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # before the first deploy made it (or a link planted in its place)
        return
    fcntl.flock(gate, fcntl.LOCK_SH)
    req.write_gate = gate


def post_request(worker, req, environ, resp):
    import os
    gate = getattr(req, "write_gate", None)
    if gate is not None:
        os.close(gate)


# The hand-over: how a deploy switches releases without a gap, and a rollback in a moment.
# A deploy points @DEPLOY_PATH@/current at the new release, then root sends SIGURG to the
# service's main process (`systemctl kill --kill-whom=main`, conf/sudoers): nothing else, and
# nothing the deploy or app user writes steers it. The live master then starts a new master on
# `current` with the same listening socket, in the same unit and sandbox. Once the new one has
# imported the app it tells the old one (SIGWINCH), which tells systemd that the new one is the
# main process now and parks: the old workers finish their requests and exit, the old master
# stays, idle, for KEEP_PREVIOUS_S. A rollback to that release within that time wakes it (its
# workers fork from the app it already imported) and retires the newer one, instead of booting
# anything. Old and new workers accept from the one socket meanwhile, so no request is refused
# or cut off. Only the main process may name the next one (NotifyAccess=main): systemd 252
# watches a main process it did not start without noticing its end, so a worker that named
# itself, or a child it then reaps, would make root's next stop kill whoever gets that number.
# SIGURG's default action is to be ignored: a process that does not expect it is not harmed.
KEEP_PREVIOUS_S = @KEEP_PREVIOUS_S@  # the setting; 0: the old master ends at once
CURRENT = "@DEPLOY_PATH@/current"
STARTED_BY = "FLASK_DEPLOY_HANDED_OVER_BY"  # the new master's environment: the old one's pid
# The new master's NOTIFY_SOCKET, under another name until it is main: gunicorn's own READY=1
# at its boot would only be refused (and logged) by systemd.
NOTIFY_LATER = "FLASK_DEPLOY_NOTIFY_SOCKET"
# Booted once: a deploy's preflight is a new master in this unit too. The deploy points
# @DEPLOY_PATH@/candidate at the new release and sends the same signal; the live master starts a
# master there which serves only the spare port, 127.0.0.1:@PREFLIGHT_PORT@, with one worker,
# for the deploy's health check. At the switch (`current` points at it, `candidate` is gone, the
# signal again) it takes the live socket: its workers fork from the app it imported at the
# preflight, and the hand-over goes on as above. Without the switch it ends (the deploy failed,
# or was killed: CANDIDATE_WAIT_S). Which release is read from links the deploy user writes,
# by the app user's own master, as `current` is: root reads none of it.
CANDIDATE = "@DEPLOY_PATH@/candidate"
PREFLIGHT_PORT = @PREFLIGHT_PORT@
CANDIDATE_ENV = "FLASK_DEPLOY_CANDIDATE"  # the new master's environment: boot as a candidate
CANDIDATE_WAIT_S = 900  # a candidate nobody switched to ends by itself


def _release_of(pid):
    """The release folder a master runs (its working folder), or None once it is gone."""
    import os
    try:
        return os.readlink("/proc/%s/cwd" % pid)
    except OSError:
        return None


def _still_a_master(pid):
    """PID if it still is another gunicorn master of this service (parked, or handing over):
    it may have ended (KEEP_PREVIOUS_S), and its number gone to another process since. 0
    otherwise."""
    import os
    try:
        with open("/proc/%d/stat" % pid) as stat:
            parent = int(stat.read().rpartition(")")[2].split()[1])
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            is_gunicorn = b"gunicorn" in cmdline.read()
    except (OSError, ValueError, IndexError):
        return 0
    release = _release_of(pid) or ""
    ours = release.startswith(os.path.dirname(CURRENT) + "/releases/") and is_gunicorn
    return pid if ours and parent != os.getpid() else 0  # a worker of this one never


def _signal(pid, number):
    import os
    try:
        os.kill(pid, number)
    except ProcessLookupError:  # it ended meanwhile: nothing left to tell
        pass


def _tell_systemd(server, state):
    """NotifyAccess=main in the unit: systemd hears the main master only."""
    from gunicorn import systemd
    systemd.sd_notify(state, server.log)


def _serving(server, successor, how):
    """From the main master: SUCCESSOR is the main process now; the status names its release
    (a deploy waits for that, server_tool.py), then HOW: "again" (it woke from parked),
    "alone" (this master ends rather than parks) or nothing (this one parks)."""
    import os
    release = os.path.basename(_release_of(successor) or "")
    _tell_systemd(server, "MAINPID=%d\nSTATUS=%s" % (successor,
                                                     " ".join(filter(None, ["serving", release,
                                                                            how]))))


def _hand_back_file(pid):
    return "/tmp/hand-back-to-%d" % pid  # PrivateTmp: the unit's own /tmp


def when_ready(server):
    """Every master: take the hand-over signal (queued, handled in the master's own loop)."""
    import os
    import signal
    old = int(os.environ.pop(STARTED_BY, "0") or 0)
    candidate = os.environ.pop(CANDIDATE_ENV, "") == "1"
    notify = os.environ.pop(NOTIFY_LATER, "")
    if notify and not candidate:
        os.environ["NOTIFY_SOCKET"] = notify
    try:
        server.SIG_NAMES.setdefault(signal.SIGURG, "urg")
        server.handle_urg = lambda: _switch(server)
        server.handle_winch = lambda: _park(server)
        server.parked = False
        server.previous_master = 0
        server.successor = 0  # the master this one started or woke: it names it main
        server.handing_back = False
        server.handed_over_by = [old] if old and not candidate else []  # _stop ends them
        server.candidate = 0  # the candidate this one started for a preflight
        server.live_listeners = None  # a candidate's, until the switch
        stop = server.handle_term
        server.handle_term = lambda: _stop(server, stop)
        signal.signal(signal.SIGURG, server.signal)
        server.START_CTX["args"], server.LISTENERS, server.cfg.env_orig  # what it needs
    except (AttributeError, KeyError, TypeError) as error:
        # Another gunicorn than this was written for: deploys then restart (server_tool.py
        # hears no answer to the hand-over signal), which is slower but just as safe.
        server.log.warning("no hand-overs with this gunicorn (%r): deploys restart", error)
        signal.signal(signal.SIGURG, signal.SIG_DFL)
        return
    if not old:  # started by systemd
        return
    if candidate:
        _wait_as_candidate(server, old, notify)
        return
    if _release_of(old) != _release_of(os.getpid()):
        server.previous_master = old
    _signal(old, signal.SIGWINCH)  # ready: the old master names this one main


def _wait_as_candidate(server, old, notify):
    """A candidate serves the spare port alone (one worker) until the switch (_go_live)."""
    import signal
    server.live_listeners, server.LISTENERS = server.LISTENERS, [_spare_port(server)]
    server.num_workers = 1
    server.started_by, server.notify_later = old, notify
    signal.signal(signal.SIGALRM, lambda *_: server.signal(signal.SIGTERM, None))
    signal.alarm(CANDIDATE_WAIT_S)


def _spare_port(server):
    """127.0.0.1:PREFLIGHT_PORT; an ended candidate's worker may hold it a moment longer."""
    import errno
    import time
    from gunicorn import sock
    deadline = time.monotonic() + 5
    while True:
        try:
            return sock.TCPSocket(("127.0.0.1", PREFLIGHT_PORT), server.cfg, server.log)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _go_live(server):
    """SIGURG to a candidate, from the live master at the switch: take the live socket (workers
    forked from the app imported already, the spare port's worker finishing its request), then
    tell the old master, which names this one main and parks, as after any hand-over."""
    import os
    import signal
    signal.alarm(0)
    spare, server.LISTENERS, server.live_listeners = server.LISTENERS, server.live_listeners, None
    server.kill_workers(signal.SIGTERM)
    for listener in spare:
        listener.close()
    server.num_workers = server.cfg.workers
    for _ in range(server.num_workers):
        server.spawn_worker()
    if server.notify_later:
        os.environ["NOTIFY_SOCKET"] = server.notify_later
    old = server.started_by
    server.handed_over_by = [old]
    if _release_of(old) != _release_of(os.getpid()):
        server.previous_master = old
    _signal(old, signal.SIGWINCH)


def _stop(server, stop):
    """SIGTERM (systemd's stop or restart): the masters that handed over to this one end too,
    each once its workers finished their requests (see on_exit)."""
    import signal
    for pid in server.handed_over_by + [server.candidate]:
        if pid and _still_a_master(pid):
            _signal(pid, signal.SIGTERM)
    stop()


def on_exit(server):
    """Wait for the masters that handed over to this one: once the main process has ended,
    systemd kills what is left of the unit (KillMode=mixed), requests in flight and all. Then
    end as a worker does (_end_without_teardown): a parked master ends in every deploy."""
    import sys
    import time
    deadline = time.monotonic() + server.cfg.graceful_timeout
    while any(_still_a_master(pid) for pid in getattr(server, "handed_over_by", ())) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    leaving = sys.exc_info()[1]  # gunicorn halts in the except of its main loop
    if isinstance(leaving, (StopIteration, KeyboardInterrupt)):  # a stop: status 0
        _end_without_teardown(0)
    elif isinstance(getattr(leaving, "exit_status", None), int):  # HaltServer's own status
        _end_without_teardown(leaving.exit_status)


def worker_exit(server, worker):
    """A worker ends without Python's teardown of the app it shares with its master: freeing
    every object copies the pages it shares (~70 ms of CPU a worker here, and each deploy ends
    three). A worker that ends another way than sys.exit ends as usual."""
    import os
    import sys
    leaving = sys.exc_info()[1]  # called in the finally of gunicorn's exit from the worker
    if os.getpid() == worker.pid and isinstance(leaving, SystemExit):
        code = leaving.code
        _end_without_teardown(code if isinstance(code, int) else 0 if code is None else 1)


def _end_without_teardown(status):
    """Exit with STATUS after the atexit handlers (logging's flush among them), skipping the
    teardown of every module and object; unless threads of the app's own still run, whose end
    the usual exit would wait for."""
    import atexit
    import os
    import sys
    import threading
    if threading.active_count() > 1:
        return
    atexit._run_exitfuncs()
    # Files the app left open (and unflushed) are flushed by the teardown this skips: written
    # lines it acknowledged would be lost. Text first: flushing one fills its buffer below.
    # (~5 ms here, not ~70: the kinds of object are few, an isinstance per object is not cheap)
    import gc
    import io
    objects = gc.get_objects()
    kinds = {kind for kind in set(map(type, objects))
             if issubclass(kind, (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom))}
    streams = [item for item in objects if type(item) in kinds]
    for stream in sorted(streams, key=lambda item: not isinstance(item, io.TextIOBase)):
        try:
            if not stream.closed:
                stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(status)


def post_fork(server, worker):
    import signal
    signal.signal(signal.SIGURG, signal.SIG_DFL)  # workers leave hand-overs to their master


def _park(server):
    """SIGWINCH from the master this one started or woke, once it is ready: tell systemd that
    one is main, then stop the workers gracefully and stay ready (or end: the same release
    again, a restore; or a rollback to the one that woke)."""
    import os
    import signal
    successor, server.successor = server.successor, 0
    if server.parked or not successor or not _release_of(successor):
        return  # no hand-over under way: nobody to name
    ends = server.handing_back or not KEEP_PREVIOUS_S or \
        _release_of(successor) == _release_of(os.getpid())
    _serving(server, successor, "again" if server.handing_back else "alone" if ends else "")
    server.handed_over_by = []  # not main now: ending them is the successor's job (_stop)
    if ends:
        server.signal(signal.SIGTERM, None)  # its workers finish their requests first
        return
    server.parked = True
    server.num_workers = 0
    server.kill_workers(signal.SIGTERM)  # each finishes its request first
    server.log.info("parked for %ss: a rollback to this release wakes it", KEEP_PREVIOUS_S)
    signal.signal(signal.SIGALRM, lambda *_: server.signal(signal.SIGTERM, None))
    signal.alarm(KEEP_PREVIOUS_S)


def _wanted_candidate():
    """The release `candidate` points at, when it is one of this service's releases."""
    import os
    if not os.path.islink(CANDIDATE):
        return None
    wanted = os.path.realpath(CANDIDATE)
    releases = os.path.dirname(CURRENT) + "/releases/"
    return wanted if wanted.startswith(releases) and os.path.isdir(wanted) else None


def _switch(server):
    """SIGURG: serve the release `current` points at, the quickest way there is; or boot the
    one `candidate` points at beside it, for a preflight."""
    import os
    import signal
    if server.live_listeners is not None:  # a candidate: the switch to it
        # Only once the deploy switched: any process of the app's user may send this signal,
        # and none of them may put a release live before `current` names it.
        if os.path.realpath(CURRENT) == _release_of(os.getpid()) and not _wanted_candidate():
            _go_live(server)
        else:
            server.log.warning("SIGURG before the switch to this candidate: ignored")
        return
    target = os.path.realpath(CURRENT)
    mine = _release_of(os.getpid())
    if server.parked:  # woken by the master it handed over to: a rollback to this release
        if mine == target:
            _wake(server)
        return
    previous = _still_a_master(server.previous_master) if server.previous_master else 0
    wanted = _wanted_candidate()
    had_candidate, server.candidate = server.candidate, 0
    candidate = _still_a_master(had_candidate) if had_candidate else 0
    if os.path.islink(CANDIDATE) and not wanted:  # names no release: end one, nothing more
        if candidate:  # (a restore's preflight needs the spare port; `current` may be its)
            _signal(candidate, signal.SIGTERM)
        _tell_systemd(server, "STATUS=serving %s; preflight ended" % os.path.basename(mine))
        return
    if candidate and not wanted and _release_of(candidate) == target:
        server.previous_master = 0
        if previous and previous != candidate:
            _signal(previous, signal.SIGTERM)  # one parked master is kept, never more
        _tell_systemd(server, "STATUS=handing over to %s" % os.path.basename(target))
        server.successor, server.handing_back = candidate, False
        _signal(candidate, signal.SIGURG)  # it takes the live socket, then says so (SIGWINCH)
        return
    if candidate and _release_of(candidate) == wanted:  # a deploy again, after one was cut
        server.candidate = candidate
        _tell_systemd(server, "STATUS=preflight of %s: pid %d" % (os.path.basename(wanted),
                                                                  candidate))
        return
    if candidate:  # the deploy failed, or wants another one
        _signal(candidate, signal.SIGTERM)
    if had_candidate and not wanted and target == mine:  # the deploy failed: that was all
        _tell_systemd(server, "STATUS=serving %s; preflight ended" % os.path.basename(mine))
        return
    if wanted:
        server.log.info("preflight of %s: booting it beside this one", wanted)
        server.candidate = _start_master(server, wanted, candidate=True)
        _tell_systemd(server, "STATUS=preflight of %s: pid %d" % (os.path.basename(wanted),
                                                                  server.candidate))
        return
    server.previous_master = 0
    _tell_systemd(server, "STATUS=handing over to %s" % os.path.basename(target))
    if previous and _release_of(previous) == target != mine:
        with open(_hand_back_file(previous), "w") as handed:
            handed.write(str(os.getpid()))
        server.successor, server.handing_back = previous, True
        _signal(previous, signal.SIGURG)  # parked on `current`: it serves again, retires this
        return
    if previous:  # parked on another release: one is kept, never more
        _signal(previous, signal.SIGTERM)
    _start_master(server, target)


def _wake(server):
    import os
    import signal
    signal.alarm(0)
    server.parked = False
    server.num_workers = server.cfg.workers
    for _ in range(server.num_workers - len(server.WORKERS)):
        server.spawn_worker()  # a fork of the app imported already (no spawn_workers' pauses)
    try:
        with open(_hand_back_file(os.getpid())) as handed:
            newer = int(handed.read())
        os.unlink(_hand_back_file(os.getpid()))
        _signal(newer, signal.SIGWINCH)  # ready: it names this one main again, and retires
        server.handed_over_by.append(newer)
    except (OSError, ValueError):
        server.log.warning("rolled back, but the master that handed back is unknown")


def _start_master(server, release, candidate=False):
    """A new master on RELEASE with this one's sockets (fds 3.., as systemd passes them) and
    environment; a CANDIDATE serves the spare port until the switch. Forked twice, so that it
    is systemd's own child: systemd then waits for it, and for its requests, when it stops or
    restarts the service. Its pid; the successor's, unless a candidate."""
    import os
    server.log.info("handing over to %s", release)
    args = server.START_CTX["args"][2:]  # [python, gunicorn, ARGS...]: the same ARGS
    python = os.path.join(release, ".venv", "bin", "python")
    sockets = [listener.fileno() for listener in server.LISTENERS]
    old = os.getpid()
    notify = os.environ.get("NOTIFY_SOCKET", "")
    pid_reader, pid_writer = os.pipe()  # the middle one says the new master's pid
    middle = os.fork()
    if middle == 0:
        try:
            new = os.fork()
            if new == 0:
                import fcntl
                spare = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in sockets]
                for index, fd in enumerate(spare):
                    os.dup2(fd, 3 + index)  # inheritable: it crosses the exec
                environ = {name: value for name, value in server.cfg.env_orig.items()
                           if name != "NOTIFY_SOCKET"}
                environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(spare)),
                               **{STARTED_BY: str(old), NOTIFY_LATER: notify,
                                  CANDIDATE_ENV: "1" if candidate else ""})
                os.chdir(release)
                os.execve(python, [python, os.path.join(release, ".venv", "bin", "gunicorn")]
                          + args, environ)
            os.write(pid_writer, str(new).encode())
        finally:
            os._exit(0)
    os.close(pid_writer)
    try:
        os.waitpid(middle, 0)
    except ChildProcessError:  # the arbiter's own SIGCHLD reaping was first
        pass
    with os.fdopen(pid_reader, "rb") as said:
        new = int(said.read() or 0)
    if not candidate:
        server.successor, server.handing_back = new, False
    return new
