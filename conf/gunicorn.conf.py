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
