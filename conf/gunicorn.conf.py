# Installed by server_setup.sh as /etc/@SERVICE_NAME@/gunicorn.conf.py
# Under systemd the listening socket comes from @SERVICE_NAME@.socket; bind is the fallback.
bind = "127.0.0.1:@APP_PORT@"
workers = @WORKERS@
timeout = 30
graceful_timeout = 20
keepalive = 5
errorlog = "-"  # journald: journalctl -u @SERVICE_NAME@
loglevel = "info"
