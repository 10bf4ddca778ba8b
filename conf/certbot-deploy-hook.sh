#!/bin/sh
# Installed by server_setup.sh (root 755): certbot runs it as root after renewing a
# certificate. nginx loads the new certificate on reload; if `nginx -t` fails, nginx is not
# reloaded and keeps serving with the certificate it has, so a renewal never takes it down.
if nginx -t -q; then
    systemctl reload nginx
else
    echo "certbot deploy hook: nginx -t fails; nginx keeps the previous certificate" >&2
    exit 1
fi
