# Installed by server_setup.sh as /etc/@SERVICE_NAME@/gunicorn.conf.py
# Under systemd the listening socket comes from @SERVICE_NAME@.socket; bind is the fallback.
bind = "127.0.0.1:@APP_PORT@"
workers = @WORKERS@
# The master imports the app once and the workers fork from it: a restart costs one import,
# not one per worker, and the workers share that memory. An app that fails to import makes
# `systemctl restart` itself fail, so a deploy sees it at once. (Restarts, never HUP reloads,
# switch releases: a reload would keep the preloaded old code.)
preload_app = True
# Releases are switched by systemd, not by gunicornc; no control socket (and no thread for it).
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
