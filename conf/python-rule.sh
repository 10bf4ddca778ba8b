#!/bin/sh
# Installed by server_setup.sh as /usr/local/sbin/@SUDOERS_NAME@-python-rule; apt runs it after
# every package change (/etc/apt/apt.conf.d/80@SUDOERS_NAME@-python-rule).
# Writes the sudo rule for the guide's `sudo -u @APP_USER@ @DEPLOY_PATH@/venv/bin/python
# --version`, bound to the sha256 of the system's python3: the path runs through links the
# deploy user controls, and sudo runs only a file with that digest. Prints ok or changed.
set -eu
rule=/etc/sudoers.d/@SUDOERS_NAME@-python
python="$(readlink -f /usr/bin/python3)"
digest="$(sha256sum "${python}" | cut -d' ' -f1)"
# sudo skips files in sudoers.d whose name holds a '.', so the staged rule is never in force.
staged="$(mktemp /etc/sudoers.d/.@SUDOERS_NAME@-python.XXXXXX)"
trap 'rm -f "${staged}"' EXIT
printf '%s\n' "@DEPLOY_USER@ ALL=(@APP_USER@) NOPASSWD: sha256:${digest} @DEPLOY_PATH@/venv/bin/python --version" > "${staged}"
chmod 440 "${staged}"
if cmp -s "${staged}" "${rule}"; then
  echo ok
  exit 0
fi
visudo -cqf "${staged}"
mv -f "${staged}" "${rule}"
echo changed
