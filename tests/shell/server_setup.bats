#!/usr/bin/env bats
# shellcheck source-path=SCRIPTDIR
# Unit tests of server_setup.sh: argument parsing, validation and the ensure_* helpers, with
# the system commands they call replaced by stubs on PATH.

setup() {
  REPO="$(cd "$(dirname "${BATS_TEST_FILENAME}")/../.." && pwd)"
  STUBS="${BATS_TEST_TMPDIR}/stubs"
  CALLS="${BATS_TEST_TMPDIR}/calls"
  mkdir -p "${STUBS}"
  : > "${CALLS}"
  PATH="${STUBS}:${PATH}"
  unset DEPLOY_USER DEPLOY_PATH SERVICE_NAME APP_PORT SUDO_USER
  # shellcheck source=../../server_setup.sh
  source "${REPO}/server_setup.sh"
  CONF_DIR="${REPO}/conf"
  ME="$(id -un)"
  MYGROUP="$(id -gn)"
}

# stub NAME [SCRIPT]: a command on PATH that records its arguments and runs SCRIPT.
stub() {
  printf '#!/usr/bin/env bash\necho "%s $*" >> "%s"\n%s\n' "$1" "${CALLS}" "${2:-exit 0}" \
    > "${STUBS}/$1"
  chmod +x "${STUBS}/$1"
}

# refute_called NAME: the stub NAME was never run (`! grep` would not fail a bats test).
refute_called() {
  if grep -q "^$1" "${CALLS}"; then
    echo "$1 was called: $(cat "${CALLS}")"
    return 1
  fi
}

# refused NAME=VALUE TEXT: validate_settings rejects that one setting with a message holding TEXT.
refused() {
  local name=${1%%=*}
  local -x "$1"
  run validate_settings
  if [ "${status}" -ne 1 ] || [[ "${output}" != *"$2"* ]]; then
    echo "${name}: status ${status}, output: ${output}"
    return 1
  fi
}

@test "defaults are the guide's values" {
  parse_args
  [ "${DEPLOY_USER}" = "deploy" ]
  [ "${APP_USER}" = "www-data" ]
  [ "${DEPLOY_PATH}" = "/var/www/flask_helpdesk" ]
  [ "${BACKUP_PATH}" = "/var/backups/flask_helpdesk" ]
  [ "${SERVICE_NAME}" = "flask-helpdesk" ]
  [ "${APP_PORT}" = "5000" ]
  [ "${PREFLIGHT_PORT}" = "5001" ]
  [ "${SITE_NAME}" = "flask_helpdesk" ]
  [ "${MODE}" = "apply" ]
}

@test "a flag wins over the environment, the environment over the default" {
  DEPLOY_USER=fromenv
  SERVICE_NAME=envservice
  parse_args --deploy-user fromflag --check --app-port 8000
  [ "${DEPLOY_USER}" = "fromflag" ]
  [ "${SERVICE_NAME}" = "envservice" ]
  [ "${MODE}" = "check" ]
  [ "${PREFLIGHT_PORT}" = "8001" ]
}

@test "an unknown option is refused" {
  run parse_args --frobnicate
  [ "${status}" -eq 1 ]
  [[ "${output}" == *"unknown option --frobnicate"* ]]
}

@test "an option without its value is refused" {
  run parse_args --deploy-path
  [ "${status}" -eq 1 ]
  [[ "${output}" == *"--deploy-path needs a value"* ]]
}

@test "bad paths, ports and names are refused with the setting's name" {
  parse_args
  refused DEPLOY_PATH=relative/path "DEPLOY_PATH=relative/path must be an absolute"
  refused BACKUP_PATH=/ "BACKUP_PATH must not be /"
  refused DEPLOY_PATH=/var/../etc "must not contain '..'"
  refused "DEPLOY_PATH=/var/www/a;b" "may hold only letters"
  refused APP_PORT=99999 "APP_PORT=99999 must be a port number"
  refused "SERVICE_NAME=bad name" "SERVICE_NAME=bad name is not a valid name"
  refused "SERVICE_NAME=.." "SERVICE_NAME=.. is not a valid name"
  refused "DEPLOY_PUBLIC_KEY=-----BEGIN OPENSSH PRIVATE KEY-----" "not an SSH public key"
}

@test "valid settings pass validation" {
  parse_args --deploy-key "ssh-ed25519 AAAAC3Nza test"
  run validate_settings
  [ "${status}" -eq 0 ]
}

@test "root without sudo or --allow-root is refused" {
  stub id 'echo 0'
  parse_args
  run ensure_privileges
  [ "${status}" -eq 1 ]
  [[ "${output}" == *"refusing to run as root"*"--allow-root"* ]]
}

@test "root with --allow-root, or through sudo, goes ahead" {
  stub id 'echo 0'
  parse_args --allow-root
  run ensure_privileges
  [ "${status}" -eq 0 ]
  parse_args
  export SUDO_USER="admin"
  run ensure_privileges
  [ "${status}" -eq 0 ]
}

@test "a non-root user re-runs the script with sudo, settings passed as flags" {
  stub id 'echo 1000'
  stub sudo 'exit 0'
  DEPLOY_PATH=/srv/helpdesk
  parse_args --check
  run ensure_privileges
  [ "${status}" -eq 0 ]
  grep -q "^sudo bash .*server_setup.sh .*--deploy-path /srv/helpdesk .*--check" "${CALLS}"
}

@test "ensure_packages installs only what is missing" {
  stub dpkg-query '[[ "$*" == *nginx* ]] && echo "install ok installed"; exit 0'
  stub apt-get
  run ensure_packages nginx ufw fail2ban
  [ "${status}" -eq 0 ]
  [[ "${output}" == "changed: install ufw fail2ban" ]]
  grep -q "^apt-get .*update" "${CALLS}"
  grep -q "^apt-get .*install -y -q --no-install-recommends ufw fail2ban$" "${CALLS}"
}

@test "ensure_packages waits while another apt holds the lock, then installs" {
  stub dpkg-query 'exit 1'
  # The first two runs meet another apt's lock (a sandbox sharing the .deb cache, or
  # unattended-upgrades), as apt says it: at once, with no waiting of its own.
  # shellcheck disable=SC2016 # $n belongs to the stub
  stub apt-get 'n=$(grep -c "^apt-get" "'"${CALLS}"'"); if [ "${n}" -le 2 ]; then
echo "E: Could not get lock /var/cache/apt/archives/lock. It is held by process 0" >&2; exit 100; fi'
  APT_LOCK_PAUSE_S=0
  run ensure_packages nginx
  [ "${status}" -eq 0 ]
  [ "$(grep -c "^apt-get .*install -y -q --no-install-recommends nginx$" "${CALLS}")" -eq 1 ]
  [ "$(grep -c "^apt-get .*update -q$" "${CALLS}")" -eq 3 ]
  [[ "${output}" == *"waiting for it"* ]]
}

@test "ensure_packages gives apt's own error when it fails for another reason, at once" {
  stub dpkg-query 'exit 1'
  stub apt-get 'echo "E: Unable to locate package nginxx" >&2; exit 100'
  APT_LOCK_PAUSE_S=0
  run ensure_packages nginxx
  [ "${status}" -ne 0 ]
  [[ "${output}" == *"E: Unable to locate package nginxx"* ]]
  [ "$(grep -c "^apt-get" "${CALLS}")" -eq 1 ]
}

@test "ensure_packages with everything installed says ok and calls no apt-get" {
  stub dpkg-query 'echo "install ok installed"'
  stub apt-get
  run ensure_packages nginx ufw
  [ "${output}" = "ok: packages nginx ufw" ]
  refute_called apt-get
}

@test "ensure_packages in check mode reports and installs nothing" {
  stub dpkg-query 'exit 1'
  stub apt-get
  MODE=check
  run ensure_packages nginx
  [ "${output}" = "would change: install nginx" ]
  refute_called apt-get
}

@test "ensure_file writes new content once, then says ok" {
  local dest="${BATS_TEST_TMPDIR}/site.conf" source="${BATS_TEST_TMPDIR}/source"
  echo "listen 80;" > "${source}"
  run ensure_file "${dest}" 644 "${ME}" "${MYGROUP}" "${source}"
  [ "${output}" = "changed: ${dest}" ]
  cmp -s "${source}" "${dest}"
  [ "$(stat -c %a "${dest}")" = "644" ]
  run ensure_file "${dest}" 644 "${ME}" "${MYGROUP}" "${source}"
  [ "${output}" = "ok: ${dest}" ]
}

@test "ensure_file fixes a wrong mode even when the content matches" {
  local dest="${BATS_TEST_TMPDIR}/sudoers" source="${BATS_TEST_TMPDIR}/source"
  echo "x" > "${source}"
  cp "${source}" "${dest}"
  chmod 666 "${dest}"
  run ensure_file "${dest}" 440 "${ME}" "${MYGROUP}" "${source}"
  [ "${output}" = "changed: ${dest}" ]
  [ "$(stat -c %a "${dest}")" = "440" ]
}

@test "ensure_file in check mode changes nothing" {
  local dest="${BATS_TEST_TMPDIR}/f" source="${BATS_TEST_TMPDIR}/source"
  echo "old" > "${dest}"
  echo "new" > "${source}"
  MODE=check
  run ensure_file "${dest}" 644 "${ME}" "${MYGROUP}" "${source}"
  [ "${output}" = "would change: ${dest}" ]
  [ "$(cat "${dest}")" = "old" ]
}

@test "ensure_file refuses content its validator rejects, leaving the old file" {
  local dest="${BATS_TEST_TMPDIR}/f" source="${BATS_TEST_TMPDIR}/source"
  echo "old" > "${dest}"
  echo "broken" > "${source}"
  run ensure_file "${dest}" 644 "${ME}" "${MYGROUP}" "${source}" false
  [ "${status}" -eq 1 ]
  [[ "${output}" == *"fails validation"* ]]
  [ "$(cat "${dest}")" = "old" ]
}

@test "ensure_dir creates a folder with its owner and mode, then says ok" {
  local dir="${BATS_TEST_TMPDIR}/releases"
  run ensure_dir "${dir}" "${ME}" "${MYGROUP}" 750
  [[ "${output}" == "changed: ${dir}/ (${ME}:${MYGROUP} 750)" ]]
  [ "$(stat -c %a "${dir}")" = "750" ]
  run ensure_dir "${dir}" "${ME}" "${MYGROUP}" 750
  [ "${output}" = "ok: ${dir}/" ]
}

@test "ensure_safe creates a folder under a user's folder by its fd, then says ok" {
  local dir="${BATS_TEST_TMPDIR}/app/releases"
  mkdir "${BATS_TEST_TMPDIR}/app"
  run ensure_safe dir "${dir}" nobody nogroup 2750
  [[ "${output}" == "changed: ${dir}/ (nobody:nogroup 2750)" ]]
  [ "$(stat -c '%a %U %G' "${dir}")" = "2750 nobody nogroup" ]
  run ensure_safe dir "${dir}" nobody nogroup 2750
  [ "${output}" = "ok: ${dir}/" ]
}

@test "ensure_safe refuses a link in a folder others can write, changing nothing through it" {
  local victim="${BATS_TEST_TMPDIR}/victim"
  mkdir -p "${victim}" "${BATS_TEST_TMPDIR}/app"
  chmod 700 "${victim}"
  ln -s "${victim}" "${BATS_TEST_TMPDIR}/app/releases"
  run ensure_safe dir "${BATS_TEST_TMPDIR}/app/releases" nobody nogroup 2777
  [ "${status}" -ne 0 ]
  [[ "${output}" == *"symbolic link or not a folder"* ]]
  ln -s "${victim}" "${BATS_TEST_TMPDIR}/app/shared"
  run ensure_safe dir "${BATS_TEST_TMPDIR}/app/shared/instance" nobody nogroup 2777
  [ "${status}" -ne 0 ]
  [[ "${output}" == *"is a symbolic link in a folder others can write"* ]]
  [ "$(stat -c '%a %U' "${victim}")" = "700 ${ME}" ]
  [ ! -e "${victim}/instance" ]
}

@test "moving the app's data never follows a link and never lands where others write" {
  local victim="${BATS_TEST_TMPDIR}/victim"
  mkdir -p "${victim}" "${BATS_TEST_TMPDIR}/app/shared"
  chmod 700 "${victim}"
  ln -s "${victim}" "${BATS_TEST_TMPDIR}/app/shared/instance"
  run safe_path move "${BATS_TEST_TMPDIR}/app/shared/instance" /nonexistent/instance \
    "${BATS_TEST_TMPDIR}/app/shared/write-gate"
  [ "${status}" -eq 0 ]
  [ "${output}" = "link" ]
  [ -L "${BATS_TEST_TMPDIR}/app/shared/instance" ]
  [ "$(stat -c '%a %U' "${victim}")" = "700 ${ME}" ]
  rm "${BATS_TEST_TMPDIR}/app/shared/instance"
  mkdir "${BATS_TEST_TMPDIR}/app/shared/instance" "${BATS_TEST_TMPDIR}/data"
  run safe_path move "${BATS_TEST_TMPDIR}/app/shared/instance" "${BATS_TEST_TMPDIR}/data/instance" \
    "${BATS_TEST_TMPDIR}/app/shared/write-gate"
  [ "${status}" -ne 0 ]
  [[ "${output}" == *"can be written by a user other than root"* ]]
  [ -d "${BATS_TEST_TMPDIR}/app/shared/instance" ]
}

@test "the units' writable paths sit under /var/lib/<service>, none under DEPLOY_PATH" {
  parse_args --service-name helpdesk --deploy-path /srv/hd --backup-path /srv/backups
  run render_template app-backup.service
  [[ "${output}" == *"ReadWritePaths=/var/lib/helpdesk/backups"* ]]
  [[ "${output}" == *"server_tool.py backup /srv/hd /var/lib/helpdesk/backups scheduled"* ]]
  [[ "${output}" != *"ReadWritePaths=/srv"* ]]
}

@test "a folder root owns needs folders above it that only root can write" {
  run ensure_safe dir "${BATS_TEST_TMPDIR}/logs" root root 755
  [ "${status}" -ne 0 ]
  [[ "${output}" == *"a folder above it can be written by a user other than root"* ]]
}

@test "templates render every value and carry the hardening block" {
  parse_args --service-name helpdesk --deploy-path /srv/hd --app-port 5100
  run render_template app.service
  [ "${status}" -eq 0 ]
  [[ "${output}" == *"ExecStart=/srv/hd/current/.venv/bin/gunicorn --config /etc/helpdesk/"* ]]
  [[ "${output}" == *"ProtectSystem=strict"* ]]
  [[ "${output}" == *"ReadWritePaths=/var/lib/helpdesk/instance -/var/lib/helpdesk/uploads"* ]]
  [[ "${output}" != *"/srv/hd/shared"* ]]
  run render_template app.socket
  [[ "${output}" == *"ListenStream=127.0.0.1:5100"* ]]
}

@test "every template renders with no placeholder left" {
  parse_args
  local template
  for template in "${CONF_DIR}"/*; do
    run render_template "$(basename "${template}")"
    [ "${status}" -eq 0 ]
    if grep -Eq "@[A-Z_]+@" <<<"${output}"; then
      echo "placeholder left in ${template}: ${output}"
      return 1
    fi
  done
}

@test "ufw rules are read from one status listing" {
  local listing=$'22/tcp                     ALLOW IN    Anywhere\n80/tcp                     ALLOW IN    Anywhere'
  ufw_has_rule 22 "${listing}"
  ufw_has_rule 80 "${listing}"
  run ufw_has_rule 443 "${listing}"
  [ "${status}" -ne 0 ]
  run ufw_has_rule 2 "${listing}"
  [ "${status}" -ne 0 ]
}

@test "HTTPS=1 without a domain or an email is refused with one line naming the setting" {
  parse_args --https --letsencrypt-email admin@example.com
  refused SERVER_NAME=_ "HTTPS=1 needs SERVER_NAME"
  refused "SERVER_NAME=*.example.com" "HTTPS=1 needs SERVER_NAME"
  parse_args --https --server-name helpdesk.example.com
  refused LETSENCRYPT_EMAIL= "HTTPS=1 needs LETSENCRYPT_EMAIL"
  refused LETSENCRYPT_EMAIL=nobody "LETSENCRYPT_EMAIL=nobody is not an email address"
  parse_args --https --server-name helpdesk.example.com --letsencrypt-email a@example.com
  refused ACME_SERVER=http://acme.example.com/dir "must be the https:// URL"
  refused ACME_CA_BUNDLE=/nonexistent/ca.pem "ACME_CA_BUNDLE=/nonexistent/ca.pem: cannot read"
  run validate_settings
  [ "${status}" -eq 0 ]
}

@test "the nginx site: no HTTPS lines when off, the challenge before a certificate, 443 after" {
  parse_args --server-name helpdesk.example.com
  run render_template nginx-site.conf
  [[ "${output}" != *"acme-challenge"* && "${output}" != *"443"* ]]
  parse_args --https --server-name helpdesk.example.com --letsencrypt-email a@example.com
  # shellcheck disable=SC2329 # render_template calls it
  certificate_present() { return 1; }
  run render_template nginx-site.conf
  [[ "${output}" == *"location ^~ /.well-known/acme-challenge/ {"*"root /var/www/acme-challenge;"* ]]
  [[ "${output}" != *"listen 443"* && "${output}" != *"return 301"* ]]
  # shellcheck disable=SC2329 # render_template calls it
  certificate_present() { return 0; }
  run render_template nginx-site.conf
  [[ "${output}" == *"listen 443 ssl default_server;"* ]]
  [[ "${output}" == *"ssl_certificate /etc/letsencrypt/live/flask_helpdesk/fullchain.pem;"* ]]
  [[ "${output}" == *"ssl_protocols TLSv1.2 TLSv1.3;"* ]]
  [[ "${output}" == *"return 301 https://\$host\$request_uri;"* ]]
  [[ "${output}" != *"Strict-Transport-Security"* ]]
  parse_args --https --hsts --server-name helpdesk.example.com --letsencrypt-email a@example.com
  run render_template nginx-site.conf
  [[ "${output}" == *"Strict-Transport-Security"* ]]
}

@test "the HTTPS settings travel through sudo as flags" {
  stub id 'echo 1000'
  stub sudo 'exit 0'
  parse_args --https --server-name h.example.com --letsencrypt-email a@example.com --hsts \
    --acme-server https://127.0.0.1:14000/dir
  run ensure_privileges
  [ "${status}" -eq 0 ]
  grep -q -- "--acme-server https://127.0.0.1:14000/dir --https --letsencrypt-email a@example.com --hsts" "${CALLS}"
}

@test "certbot's failure becomes the ACME server's own words, or a timeout" {
  printf '%s\n' "Saving debug log" "Certbot failed to authenticate some domains" \
    "  Domain: wrong.test" "  Type:   connection" \
    "  Detail: 127.0.0.2: Fetching http://wrong.test/.well-known/acme-challenge/x: Connection refused" \
    "" "Hint: make sure" > "${BATS_TEST_TMPDIR}/out"
  run acme_error "${BATS_TEST_TMPDIR}/out" 1
  [ "${output}" = "127.0.0.2: Fetching http://wrong.test/.well-known/acme-challenge/x: Connection refused" ]
  run acme_error "${BATS_TEST_TMPDIR}/out" 124
  [[ "${output}" == "certbot had no answer within 300 s" ]]
}

@test "the stamp records script, templates and settings, never the deploy key" {
  parse_args --deploy-key "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 deploy" --workers 3
  run stamp_text
  [ "${status}" -eq 0 ]
  [[ "${output}" == *"WORKERS=3"* ]]
  [[ "${output}" == *"script=$(script_digest)"* ]]
  [[ "${output}" == *"templates=$(templates_digest)"* ]]
  [[ "${output}" != *"AAAAC3Nza"* ]]
}

@test "--migrate-command is accepted and ignored with a note (deploys carry it)" {
  run parse_args --migrate-command "flask --app wsgi migrate"
  [ "${status}" -eq 0 ]
  [[ "${output}" == *"--migrate-command is ignored"* ]]
}

@test "copied alone, the script renders from its embedded templates" {
  cp "${REPO}/server_setup.sh" "${BATS_TEST_TMPDIR}/server_setup.sh"
  run bash -c 'source "$1"; parse_args; echo "[${CONF_DIR}]"; render_template app.socket' \
    bash "${BATS_TEST_TMPDIR}/server_setup.sh"
  [ "${status}" -eq 0 ]
  [[ "${output}" == "[]"* ]]
  [[ "${output}" == *"ListenStream=127.0.0.1:5000"* ]]
}

@test "the firewall keeps open SSH_PORT, every port sshd listens on and this session's port" {
  stub sshd 'printf "port 2222\nport 22\nlistenaddress [::]:2222\nlistenaddress 0.0.0.0:2200\n"'
  parse_args --ssh-port 40022
  SSH_CONNECTION="127.0.0.1 51000 127.0.0.1 2022"
  find_ssh_ports
  [ "${SSH_PORTS}" = "22,2022,2200,2222,40022" ]
  run render_template fail2ban-sshd.local
  [[ "${output}" == *"port = 22,2022,2200,2222,40022"* ]]
}

@test "this session's port survives the re-run with sudo as a flag" {
  parse_args --session-ssh-port 2222
  unset SSH_CONNECTION
  [ "$(session_ssh_port)" = "2222" ]
  SESSION_SSH_PORT=""
  SSH_CONNECTION="10.0.0.1 51000 10.0.0.2 2223"
  [[ "$(settings_as_flags | tr '\0' ' ')" == *"--session-ssh-port 2223"* ]]
}

@test "ufw is never enabled when this session's port would not be allowed" {
  # shellcheck disable=SC2016 # $1 is the stub's own argument
  stub ufw 'case "$1" in status) echo "Status: inactive";; show) echo "ufw allow 80/tcp";; esac'
  parse_args --ssh-port 22
  SSH_PORTS="22"
  SESSION_SSH_PORT=2222
  run ensure_firewall
  [ "${status}" -ne 0 ]
  [[ "${output}" == *"error: ufw would shut out this SSH session (port 2222)"* ]]
  refute_called "ufw --force enable"
}

@test "across filesystems the app's data is copied by its own user with the app stopped" {
  # shellcheck disable=SC2016 # runuser's "$@" belongs to the stub
  stub runuser 'while [ "$1" != "--" ]; do shift; done; shift; exec "$@"'
  stub systemctl 'exit 0'
  parse_args --app-user daemon --deploy-user "${ME}" --service-name helpdesk
  local old="${BATS_TEST_TMPDIR}/app/shared/instance" new="${BATS_TEST_TMPDIR}/data/instance"
  mkdir -p "${old}/sub" "${BATS_TEST_TMPDIR}/data"
  echo tickets > "${old}/helpdesk.sqlite3"
  echo photo > "${old}/sub/a.png"
  chown -R daemon "${old}"
  run copy_app_data "${old}" "${new}"
  [ "${status}" -eq 0 ]
  [[ "${output}" == *"changed: ${old}/ copied to ${new}/ (another filesystem; the app stops"* ]]
  [ "$(cat "${new}/helpdesk.sqlite3")" = "tickets" ]
  [ "$(cat "${new}/sub/a.png")" = "photo" ]
  [ "$(stat -c '%U' "${new}")" = "daemon" ]
  [ ! -e "${old}" ]
  grep -q "^systemctl stop helpdesk.socket helpdesk.service" "${CALLS}"
  grep -q "^systemctl start helpdesk.socket" "${CALLS}"
}
