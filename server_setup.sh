#!/usr/bin/env bash
# Turns a bare Debian 12 / Ubuntu 22.04+ server into a deploy target for a Flask app, as the
# deployment guide's step 1 and security section describe. Idempotent: every step checks first
# and prints `ok:` (nothing to do) or `changed:`; with --check it prints `would change:` and
# changes nothing. Run it as a user with sudo (it re-runs itself with sudo), not as root.
#
# Usage: ./server_setup.sh [options]    (./server_setup.sh --help lists them)

# -- settings: flag > environment variable > the guide's default -----------------------------
DEPLOY_USER="${DEPLOY_USER:-deploy}"
APP_USER="${APP_USER:-www-data}"
DEPLOY_PATH="${DEPLOY_PATH:-/var/www/flask_helpdesk}"
BACKUP_PATH="${BACKUP_PATH:-/var/backups/flask_helpdesk}"
LOG_PATH="${LOG_PATH:-/var/log/flask_helpdesk}"
SERVICE_NAME="${SERVICE_NAME:-flask-helpdesk}"
APP_PORT="${APP_PORT:-5000}"
PREFLIGHT_PORT="${PREFLIGHT_PORT:-}"
SSH_PORT="${SSH_PORT:-22}"
SESSION_SSH_PORT=""  # the port this SSH session came in on; carried through sudo as a flag
SSH_PORTS=""         # every SSH port the firewall keeps open (find_ssh_ports)
SERVER_NAME="${SERVER_NAME:-_}"
SITE_NAME="${SITE_NAME:-}"
WORKERS="${WORKERS:-2}"
KEEP_PREVIOUS_S="${KEEP_PREVIOUS_S:-900}"
BACKUP_SCHEDULE="${BACKUP_SCHEDULE:-daily}"
BACKUPS_KEEP="${BACKUPS_KEEP:-10}"
BACKUPS_KEEP_DAYS="${BACKUPS_KEEP_DAYS:-7}"
DEPLOY_PUBLIC_KEY="${DEPLOY_PUBLIC_KEY:-}"
CONF_DIR="${CONF_DIR:-}"
HTTPS="${HTTPS:-0}"
LETSENCRYPT_EMAIL="${LETSENCRYPT_EMAIL:-}"
ACME_SERVER="${ACME_SERVER:-https://acme-v02.api.letsencrypt.org/directory}"
ACME_CA_BUNDLE="${ACME_CA_BUNDLE:-}"
HSTS="${HSTS:-0}"
MODE="apply"
UPGRADE=0
ALLOW_ROOT=0
DEPLOY_KEY_VERIFIED=0

readonly PACKAGES=(python3 python3-venv python3-systemd nginx supervisor ufw fail2ban logrotate
  curl htop)
readonly SSH_HARDENING_FILE=/etc/ssh/sshd_config.d/10-flask-deploy-hardening.conf
# HTTPS: certbot's folder, the challenge webroot (only root writes it: nothing the deploy or
# app user can write steers what root's certbot serves), and a custom ACME server's CA.
readonly LETSENCRYPT_DIR=/etc/letsencrypt
readonly ACME_WEBROOT=/var/www/acme-challenge
readonly ACME_CA_FILE=/etc/letsencrypt/acme-server-ca.pem
readonly ACME_TIMEOUT_S=300
# The same pattern as scripts/settings.py's SERVICE_NAME (a unit test holds them equal): it
# names /etc/<name>/, a sudoers file and units, so no '/', no leading '.' or '-'.
readonly SERVICE_NAME_PATTERN='^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'

# Filled in by the steps that need them; templates read them through render_values.
SUDOERS_NAME=""
PERMIT_ROOT_LOGIN="no"
SSH_HARDENING="waiting"

CHANGES=0
UNCHANGED=0
FILE_CHANGED=0

err() { echo "error: $*" >&2; }
die() { err "$@"; exit 1; }

usage() {
  cat <<'USAGE'
Usage: server_setup.sh [options]
  --deploy-user NAME      user that deploys and owns releases (DEPLOY_USER, default deploy)
  --app-user NAME         user the app runs as (APP_USER, default www-data)
  --deploy-path PATH      releases live here (DEPLOY_PATH, default /var/www/flask_helpdesk)
  --backup-path PATH      database backups (BACKUP_PATH, default /var/backups/flask_helpdesk)
  --log-path PATH         app logs (LOG_PATH, default /var/log/flask_helpdesk)
  --service-name NAME     systemd service (SERVICE_NAME, default flask-helpdesk)
  --app-port PORT         gunicorn port on 127.0.0.1 (APP_PORT, default 5000)
  --preflight-port PORT   port for a new release's health check (PREFLIGHT_PORT, APP_PORT+1)
  --ssh-port PORT         SSH port kept open in the firewall (SSH_PORT, default 22), besides
                          the ports sshd listens on and the one this session came in on
  --server-name NAME      nginx server_name, your domain (SERVER_NAME, default _ = any)
  --site-name NAME        nginx site and log name (SITE_NAME, default: DEPLOY_PATH's last part)
  --workers N             gunicorn workers (WORKERS, default 2)
  --keep-previous-s N     seconds a deploy keeps the previous release loaded, for a rollback
                          without a boot (KEEP_PREVIOUS_S, default 900; 0: not kept)
  --backup-schedule WHEN  scheduled backups, a systemd OnCalendar value (BACKUP_SCHEDULE, daily)
  --backups-keep N        newest backups kept (BACKUPS_KEEP, default 10)
  --backups-keep-days N   backups younger than N days are kept (BACKUPS_KEEP_DAYS, default 7)
  --deploy-key KEY        the deploy user's SSH public key (DEPLOY_PUBLIC_KEY)
  --deploy-key-file FILE  ... or read it from a file
  --deploy-key-verified   the deploy key was seen to work: SSH hardening may be applied
  --conf-dir DIR          templates (CONF_DIR, default: conf/ beside this script if there
                          is one, else the copies embedded in this script)
  --https                 Let's Encrypt certificate for --server-name, port 443, HTTP
                          redirected to HTTPS (HTTPS=1; needs --server-name, --letsencrypt-email)
  --letsencrypt-email A   the ACME account's email: expiry notices (LETSENCRYPT_EMAIL)
  --acme-server URL       ACME directory (ACME_SERVER, default Let's Encrypt's)
  --acme-ca-bundle FILE   CA of a custom ACME server's TLS listener (ACME_CA_BUNDLE)
  --hsts                  send Strict-Transport-Security over HTTPS (HSTS=1)
  --upgrade               also run apt-get upgrade
  --check                 dry run: report what would change, change nothing
  --allow-root            run as root without sudo (the guide advises against it)
  -h, --help              this text
USAGE
}

# -- argument parsing and validation ----------------------------------------------------------
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value; see --help"
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --deploy-user) need_value "$@"; DEPLOY_USER="$2"; shift ;;
      --app-user) need_value "$@"; APP_USER="$2"; shift ;;
      --deploy-path) need_value "$@"; DEPLOY_PATH="$2"; shift ;;
      --backup-path) need_value "$@"; BACKUP_PATH="$2"; shift ;;
      --log-path) need_value "$@"; LOG_PATH="$2"; shift ;;
      --service-name) need_value "$@"; SERVICE_NAME="$2"; shift ;;
      --app-port) need_value "$@"; APP_PORT="$2"; shift ;;
      --preflight-port) need_value "$@"; PREFLIGHT_PORT="$2"; shift ;;
      --ssh-port) need_value "$@"; SSH_PORT="$2"; shift ;;
      --session-ssh-port) need_value "$@"; SESSION_SSH_PORT="$2"; shift ;;
      --server-name) need_value "$@"; SERVER_NAME="$2"; shift ;;
      --site-name) need_value "$@"; SITE_NAME="$2"; shift ;;
      --workers) need_value "$@"; WORKERS="$2"; shift ;;
      --keep-previous-s) need_value "$@"; KEEP_PREVIOUS_S="$2"; shift ;;
      --migrate-command)  # older setups baked it into a unit; deploys carry it now
        need_value "$@"
        echo "note: --migrate-command is ignored: MIGRATE_COMMAND travels with each deploy"
        shift ;;
      --backup-schedule) need_value "$@"; BACKUP_SCHEDULE="$2"; shift ;;
      --backups-keep) need_value "$@"; BACKUPS_KEEP="$2"; shift ;;
      --backups-keep-days) need_value "$@"; BACKUPS_KEEP_DAYS="$2"; shift ;;
      --deploy-key) need_value "$@"; DEPLOY_PUBLIC_KEY="$2"; shift ;;
      --deploy-key-file)
        need_value "$@"
        [[ -r "$2" ]] || die "--deploy-key-file $2: cannot read it"
        DEPLOY_PUBLIC_KEY="$(<"$2")"
        shift ;;
      --deploy-key-verified) DEPLOY_KEY_VERIFIED=1 ;;
      --conf-dir) need_value "$@"; CONF_DIR="$2"; shift ;;
      --https) HTTPS=1 ;;
      --letsencrypt-email) need_value "$@"; LETSENCRYPT_EMAIL="$2"; shift ;;
      --acme-server) need_value "$@"; ACME_SERVER="$2"; shift ;;
      --acme-ca-bundle) need_value "$@"; ACME_CA_BUNDLE="$2"; shift ;;
      --hsts) HSTS=1 ;;
      --upgrade) UPGRADE=1 ;;
      --check) MODE="check" ;;
      --allow-root) ALLOW_ROOT=1 ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown option $1; see --help" ;;
    esac
    shift
  done
  PREFLIGHT_PORT="${PREFLIGHT_PORT:-$((APP_PORT + 1))}"
  SITE_NAME="${SITE_NAME:-${DEPLOY_PATH##*/}}"
  SUDOERS_NAME="${SERVICE_NAME//./_}-deploy"  # sudo skips files in sudoers.d with a dot
  CONF_DIR="${CONF_DIR:-$(beside_conf_dir)}"
}

validate_path() {
  local name="$1" value="$2"
  [[ "${value}" == /* ]] || die "${name}=${value} must be an absolute path"
  [[ "${value}" != "/" ]] || die "${name} must not be /"
  [[ "${value}" =~ ^/[A-Za-z0-9._/-]+$ ]] \
    || die "${name}=${value} may hold only letters, digits, '.', '_', '-' and '/'"
  [[ "/${value}/" != *"/../"* ]] || die "${name}=${value} must not contain '..'"
}

validate_port() {
  local name="$1" value="$2"
  if [[ ! "${value}" =~ ^[0-9]+$ ]] || (( value < 1 || value > 65535 )); then
    die "${name}=${value} must be a port number from 1 to 65535"
  fi
}

validate_name() {
  local name="$1" value="$2" pattern="$3"
  [[ "${value}" =~ ${pattern} ]] || die "${name}=${value} is not a valid name"
}

validate_settings() {
  validate_name DEPLOY_USER "${DEPLOY_USER}" '^[a-z_][a-z0-9_-]{0,31}$'
  validate_name APP_USER "${APP_USER}" '^[a-z_][a-z0-9_-]{0,31}$'
  validate_name SERVICE_NAME "${SERVICE_NAME}" "${SERVICE_NAME_PATTERN}"
  validate_name SITE_NAME "${SITE_NAME}" '^[A-Za-z0-9_.-]{1,100}$'
  validate_name SERVER_NAME "${SERVER_NAME}" '^[A-Za-z0-9_.* -]{1,250}$'
  validate_name WORKERS "${WORKERS}" '^[1-9][0-9]?$'
  validate_name KEEP_PREVIOUS_S "${KEEP_PREVIOUS_S}" '^(0|[1-9][0-9]{0,4})$'
  validate_name BACKUP_SCHEDULE "${BACKUP_SCHEDULE}" '^[A-Za-z0-9 :*/,.~-]{1,100}$'
  validate_name BACKUPS_KEEP "${BACKUPS_KEEP}" '^[1-9][0-9]{0,3}$'
  validate_name BACKUPS_KEEP_DAYS "${BACKUPS_KEEP_DAYS}" '^[0-9]{1,5}(\.[0-9]+)?$'
  validate_path DEPLOY_PATH "${DEPLOY_PATH}"
  validate_path BACKUP_PATH "${BACKUP_PATH}"
  validate_path LOG_PATH "${LOG_PATH}"
  validate_port APP_PORT "${APP_PORT}"
  validate_port PREFLIGHT_PORT "${PREFLIGHT_PORT}"
  validate_port SSH_PORT "${SSH_PORT}"
  [[ "${APP_PORT}" != "${PREFLIGHT_PORT}" ]] || die "PREFLIGHT_PORT must differ from APP_PORT"
  if [[ -n "${DEPLOY_PUBLIC_KEY}" && ! "${DEPLOY_PUBLIC_KEY}" =~ ^(ssh-|ecdsa-|sk-) ]]; then
    die "the deploy key is not an SSH public key (it should start with ssh-ed25519, ssh-rsa...)"
  fi
  [[ -z "${CONF_DIR}" || -d "${CONF_DIR}" ]] || die "--conf-dir ${CONF_DIR}: no such folder"
  validate_https_settings
}

# -- privileges: refuse plain root, re-run with sudo otherwise --------------------------------
current_uid() { id -u; }

settings_as_flags() {
  local flags=(--deploy-user "${DEPLOY_USER}" --app-user "${APP_USER}"
    --deploy-path "${DEPLOY_PATH}" --backup-path "${BACKUP_PATH}" --log-path "${LOG_PATH}"
    --service-name "${SERVICE_NAME}" --app-port "${APP_PORT}"
    --preflight-port "${PREFLIGHT_PORT}" --ssh-port "${SSH_PORT}"
    --server-name "${SERVER_NAME}" --site-name "${SITE_NAME}" --workers "${WORKERS}"
    --keep-previous-s "${KEEP_PREVIOUS_S}" --backup-schedule "${BACKUP_SCHEDULE}"
    --backups-keep "${BACKUPS_KEEP}" --backups-keep-days "${BACKUPS_KEEP_DAYS}")
  [[ -z "${CONF_DIR}" ]] || flags+=(--conf-dir "${CONF_DIR}")
  [[ -z "${DEPLOY_PUBLIC_KEY}" ]] || flags+=(--deploy-key "${DEPLOY_PUBLIC_KEY}")
  local session
  session="$(session_ssh_port)"
  [[ -z "${session}" ]] || flags+=(--session-ssh-port "${session}")
  [[ "${DEPLOY_KEY_VERIFIED}" -eq 0 ]] || flags+=(--deploy-key-verified)
  [[ "${UPGRADE}" -eq 0 ]] || flags+=(--upgrade)
  [[ "${MODE}" != "check" ]] || flags+=(--check)
  mapfile -d '' -O "${#flags[@]}" flags < <(https_flags)
  printf '%s\0' "${flags[@]}"
}

ensure_privileges() {
  if [[ "$(current_uid)" -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and sudo is missing; run it as a user with sudo"
    local flags=()
    mapfile -d '' flags < <(settings_as_flags)
    echo "setup: re-running with sudo"
    exec sudo bash "${BASH_SOURCE[0]}" "${flags[@]}"
  fi
  if [[ -z "${SUDO_USER:-}" && "${ALLOW_ROOT}" -ne 1 ]]; then
    die "refusing to run as root (the guide runs it as a user with sudo); pass --allow-root" \
      "to run it as root anyway"
  fi
}

# -- reporting --------------------------------------------------------------------------------
report_ok() {
  echo "ok: $*"
  UNCHANGED=$((UNCHANGED + 1))
}

# Returns 0 when the caller should act (apply mode), 1 in check mode (nothing may change).
report_change() {
  CHANGES=$((CHANGES + 1))
  if [[ "${MODE}" == "check" ]]; then
    echo "would change: $*"
    return 1
  fi
  echo "changed: $*"
}

# -- templates: conf/ beside the script, or the copies embedded at its end ---------------------
# In a checkout, conf/ beside the script wins: it is the one source, and the embedded copies are
# generated from it (they lag until `python -m scripts.embed_templates` runs). Copied alone to a
# server, the script uses its embedded copies. The stamp records which templates were used.
beside_conf_dir() {
  local beside
  beside="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/conf"
  if [[ -f "${beside}/app.service" ]]; then
    echo "${beside}"
  fi
}

template_names() {
  if [[ -n "${CONF_DIR}" ]]; then
    find "${CONF_DIR}" -maxdepth 1 -type f -printf '%f\n' | LC_ALL=C sort
  else
    embedded_template_names
  fi
}

template_text() {
  if [[ -n "${CONF_DIR}" ]]; then
    cat "${CONF_DIR}/$1"
  else
    embedded_template "$1" || die "no template $1 is embedded in this script"
  fi
}

# templates_digest / script_digest: what the stamp records and `doit check` compares with its
# own copy (scripts/embed_templates.py computes the same).
templates_digest() {
  local name sum
  for name in $(template_names); do
    sum="$(template_text "${name}" | sha256sum)"
    printf '%s  %s\n' "${sum%% *}" "${name}"
  done | sha256sum | cut -d' ' -f1
}

script_digest() {
  sed -e '/^# >>> embedded templates/,/^# <<< embedded templates/d' "${BASH_SOURCE[0]}" \
    | sha256sum | cut -d' ' -f1
}

# -- generic ensure_* helpers -----------------------------------------------------------------
render_template() {
  local template="$1" hardening https
  hardening="$(mktemp)"
  https="$(mktemp)"
  render_values hardening.conf > "${hardening}"
  render_https_block > "${https}"
  render_values "${template}" \
    | sed -e "/^@HARDENING@\$/{r ${hardening}" -e 'd;}' -e "/^@HTTPS@\$/{r ${https}" -e 'd;}'
  rm -f "${hardening}" "${https}"
}

render_values() {
  local escaped=() pair name value
  local data open_data
  data="$(data_path)"
  open_data="/usr/bin/find ${data}/instance ${data}/uploads"
  open_data+=" -maxdepth 1 -type f -user ${APP_USER} -exec chmod g+rw {} +"
  local pairs=("DEPLOY_USER=${DEPLOY_USER}" "APP_USER=${APP_USER}" "DEPLOY_PATH=${DEPLOY_PATH}"
    "BACKUP_PATH=${BACKUP_PATH}" "LOG_PATH=${LOG_PATH}" "SERVICE_NAME=${SERVICE_NAME}"
    "APP_PORT=${APP_PORT}" "PREFLIGHT_PORT=${PREFLIGHT_PORT}" "SSH_PORT=${SSH_PORT}"
    "SERVER_NAME=${SERVER_NAME}" "SITE_NAME=${SITE_NAME}" "WORKERS=${WORKERS}"
    "KEEP_PREVIOUS_S=${KEEP_PREVIOUS_S}"
    "SUDOERS_NAME=${SUDOERS_NAME}"
    "BACKUP_SCHEDULE=${BACKUP_SCHEDULE}" "BACKUPS_KEEP=${BACKUPS_KEEP}"
    "BACKUPS_KEEP_DAYS=${BACKUPS_KEEP_DAYS}"
    "PERMIT_ROOT_LOGIN=${PERMIT_ROOT_LOGIN}" "OPEN_DATA_TO_GROUP=${open_data}"
    "ACME_WEBROOT=${ACME_WEBROOT}" "CERT_DIR=${LETSENCRYPT_DIR}/live/${SITE_NAME}"
    "ACME_CA_FILE=${ACME_CA_FILE}"
    "DATA_PATH=${data}" "SSH_PORTS=${SSH_PORTS:-${SSH_PORT}}")
  for pair in "${pairs[@]}"; do
    name="${pair%%=*}"
    value="${pair#*=}"
    value="${value//\\/\\\\}"
    value="${value//|/\\|}"
    value="${value//&/\\&}"
    escaped+=(-e "s|@${name}@|${value}|g")
  done
  template_text "$1" | sed "${escaped[@]}"
}

# ensure_file DEST MODE OWNER GROUP SOURCE [VALIDATOR...]: DEST gets SOURCE's content, mode and
# owner. The validator runs on the new content (its path appended) before it is installed.
# Sets FILE_CHANGED=1 when DEST was (or in check mode would be) changed.
ensure_file() {
  local dest="$1" mode="$2" owner="$3" group="$4" source="$5"
  shift 5
  FILE_CHANGED=0
  if [[ -f "${dest}" ]] && cmp -s "${source}" "${dest}" \
    && [[ "$(stat -c '%a %U %G' "${dest}")" == "${mode} ${owner} ${group}" ]]; then
    report_ok "${dest}"
    return 0
  fi
  FILE_CHANGED=1
  report_change "${dest}" || return 0
  if [[ $# -gt 0 ]] && ! "$@" "${source}" >/dev/null 2>&1; then
    die "${dest}: the new content fails validation ($*); nothing was installed"
  fi
  local staged
  staged="$(dirname "${dest}")/.$(basename "${dest}").new"
  install -m "${mode}" -o "${owner}" -g "${group}" "${source}" "${staged}"
  mv -f "${staged}" "${dest}"
}

# ensure_template TEMPLATE DEST MODE OWNER GROUP [VALIDATOR...]
ensure_template() {
  local template="$1" dest="$2" mode="$3" owner="$4" group="$5"
  shift 5
  local rendered
  rendered="$(mktemp)"
  render_template "${template}" > "${rendered}"
  ensure_file "${dest}" "${mode}" "${owner}" "${group}" "${rendered}" "$@"
  rm -f "${rendered}"
}

ensure_dir() {
  local path="$1" owner="$2" group="$3" mode="$4"
  if [[ -d "${path}" && "$(stat -c '%a %U %G' "${path}")" == "${mode} ${owner} ${group}" ]]; then
    report_ok "${path}/"
    return 0
  fi
  report_change "${path}/ (${owner}:${group} ${mode})" || return 0
  install -d -m "${mode}" -o "${owner}" -g "${group}" "${path}"
  chmod "${mode}" "${path}"  # install -d leaves the mode of an existing folder alone
}

# -- paths the deploy user or the app can write -----------------------------------------------
# Root never acts through a path that deploy or www-data can create or replace (README,
# Security). Inside their folders, root walks one folder at a time with O_NOFOLLOW and changes
# what it opened (fchown, fchmod), as systemd's "safe" path resolution does; a link there is
# refused, except a root-owned link in a folder only root can write. Work that needs no root is
# done as the user (runuser), with that user's rights and nothing more.
# Usage: python3 -c "$SAFE_PATH_PY" dir|file|clean PATH [OWNER GROUP MODE CHECK]
#        python3 -c "$SAFE_PATH_PY" move OLD NEW GATE
read -r -d '' SAFE_PATH_PY <<'PY' || true
import os, pwd, grp, stat, sys

def trusted(st):
    return st.st_uid == 0 and not st.st_mode & 0o022

def walk(path):
    """An O_NOFOLLOW fd of path's parent, the last name, and whether every folder above is
    one only root can write."""
    parts, hops = [p for p in path.split("/") if p], 0
    fd, safe, done = os.open("/", os.O_RDONLY | os.O_DIRECTORY), True, []
    while len(parts) > 1:
        name = parts.pop(0)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if not (safe and st.st_uid == 0) or hops > 20:
                sys.exit("error: %s: /%s is a symbolic link in a folder others can write; "
                         "server_setup.sh acts on real folders only (remove the link, run "
                         "again)" % (path, "/".join(done + [name])))
            target = os.readlink(name, dir_fd=fd)
            base = target if target.startswith("/") else "/".join([""] + done + [target])
            parts = [p for p in base.split("/") if p] + parts
            os.close(fd)
            fd, safe, done = os.open("/", os.O_RDONLY | os.O_DIRECTORY), True, []
            continue
        if not stat.S_ISDIR(st.st_mode):
            sys.exit("error: %s: /%s is not a folder" % (path, "/".join(done + [name])))
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd, safe = child, safe and trusted(os.fstat(child))
        done.append(name)
    return fd, parts[0], safe

def settle(fd, path, owner, group, mode, check, created):
    st = os.fstat(fd)
    uid, gid = pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid
    if not created and (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, mode):
        return print("ok")
    if check:
        return print("would change")
    os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)
    print("changed")

def ensure_dir(path, owner, group, mode, check):
    parent, name, safe = walk(path)
    if owner == "root" and not safe:
        sys.exit("error: %s: a folder above it can be written by a user other than root, who "
                 "could swap it; choose a path under folders only root can write" % path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        created = False
    except FileNotFoundError:
        if check:
            return print("would change")
        os.mkdir(name, 0o700, dir_fd=parent)
        fd, created = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=parent), True
    except OSError:
        sys.exit("error: %s is a symbolic link or not a folder; remove it and run again" % path)
    settle(fd, path, owner, group, mode, check, created)

def ensure_file(path, owner, group, mode, check):
    """A regular file with one link, in a folder only root can write (the app's logs)."""
    parent, name, safe = walk(path)
    if not (safe and trusted(os.fstat(parent))):
        sys.exit("error: %s: its folder can be written by a user other than root" % path)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            if check:
                return print("would change")
            os.unlink(name, dir_fd=parent)  # a planted link or hard link: never written through
    except FileNotFoundError:
        if check:
            return print("would change")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = os.open(name, flags, 0o600, dir_fd=parent)
    settle(fd, path, owner, group, mode, check, False)

def clean(path):
    """Remove links, hard links and other non-files from a folder root now owns."""
    parent, name, safe = walk(path)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    if not (safe and trusted(os.fstat(fd))):
        sys.exit("error: %s: others can write it; not cleaning it" % path)
    removed = []
    for entry in sorted(os.listdir(fd)):
        st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            if stat.S_ISDIR(st.st_mode):
                continue
            os.unlink(entry, dir_fd=fd)
            removed.append(entry)
    print(" ".join(removed))

def move(old, new, gate):
    """Move the folder OLD (in a folder others write) to NEW (in one only root writes) by one
    rename, never through a link: prints none (nothing there), link (a link at OLD is never
    followed: moved before, or planted), moved, or copy (another filesystem: the caller copies
    it). The app's requests wait on the write gate meanwhile; a running app keeps its files,
    as they move with the folder."""
    import errno, fcntl
    parent, name, _ = walk(old)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return print("none")
    if stat.S_ISLNK(st.st_mode):
        return print("link")
    if not stat.S_ISDIR(st.st_mode):
        sys.exit("error: %s is not a folder; move it away and run again" % old)
    target, target_name, safe = walk(new)
    if not (safe and trusted(os.fstat(target))):
        sys.exit("error: %s: its folder can be written by a user other than root" % new)
    try:  # the gate: a plain file in a folder deploy owns, opened without following a link
        held = os.open(gate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if stat.S_ISREG(os.fstat(held).st_mode):
            fcntl.flock(held, fcntl.LOCK_EX)
    except OSError:
        held = None
    try:
        os.rename(name, target_name, src_dir_fd=parent, dst_dir_fd=target)
    except OSError as error:
        if error.errno == errno.EXDEV:
            return print("copy")
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            sys.exit("error: %s and %s both hold files; keep one (the app's data), remove the "
                     "other, and run again" % (old, new))
        raise
    st = os.stat(target_name, dir_fd=target, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):  # swapped for a link between the look and the rename
        os.unlink(target_name, dir_fd=target)
        sys.exit("error: %s was swapped for a link while it moved; nothing moved" % old)
    print("moved")

verb, path = sys.argv[1], sys.argv[2]
try:
    if verb == "clean":
        clean(path)
    elif verb == "move":
        move(path, sys.argv[3], sys.argv[4])
    else:
        owner, group, mode, check = sys.argv[3], sys.argv[4], int(sys.argv[5], 8), sys.argv[6]
        (ensure_dir if verb == "dir" else ensure_file)(path, owner, group, mode, check == "1")
except OSError as error:
    sys.exit("error: %s: %s" % (path, error))
PY
readonly SAFE_PATH_PY

safe_path() {
  python3 -I -c "${SAFE_PATH_PY}" "$@"
}

# ensure_safe dir|file PATH OWNER GROUP MODE: as ensure_dir, for paths under folders that the
# deploy user or the app can write.
ensure_safe() {
  local kind="$1" path="$2" owner="$3" group="$4" mode="$5" state check=0 label="$2"
  [[ "${kind}" == file ]] || label="${path}/"
  [[ "${MODE}" == "check" ]] && check=1
  if ! command -v python3 >/dev/null; then
    report_change "${label} (${owner}:${group} ${mode})" || return 0
    die "python3 is missing; it is installed by the packages step"
  fi
  state="$(safe_path "${kind}" "${path}" "${owner}" "${group}" "${mode}" "${check}")" || exit 1
  case "${state}" in
    ok) report_ok "${label}" ;;
    *) report_change "${label} (${owner}:${group} ${mode})" || true ;;
  esac
}

# as_user USER COMMAND...: COMMAND with USER's rights only (for files in USER's own folders).
as_user() {
  runuser -u "$1" -- "${@:2}"
}

package_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

ensure_packages() {
  local missing=() package
  for package in "$@"; do
    package_installed "${package}" || missing+=("${package}")
  done
  if [[ "${#missing[@]}" -eq 0 ]]; then
    report_ok "packages $*"
    return 0
  fi
  report_change "install ${missing[*]}" || return 0
  apt_get update -q && apt_get install -y -q --no-install-recommends "${missing[@]}"
}

ensure_upgraded() {
  [[ "${UPGRADE}" -eq 1 ]] || return 0
  report_change "apt-get upgrade" || return 0
  apt_get update -q && apt_get upgrade -y -q
}

# apt_get ARGS...: apt-get (output only on failure), waiting while another apt holds its locks:
# unattended-upgrades on a fresh cloud server, or a sandbox sharing the .deb cache with others.
# apt fails at once on a held lock ("Could not get lock"; DPkg::Lock::Timeout covers dpkg's only).
APT_LOCK_TRIES=60
APT_LOCK_PAUSE_S=5
apt_get() {
  local try errors
  for ((try = 1; try <= APT_LOCK_TRIES; try++)); do
    if errors="$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 "$@" 2>&1 \
      >/dev/null)"; then
      return 0
    fi
    [[ "${errors}" == *"Could not get lock"* || "${errors}" == *"Unable to lock"* ]] || break
    [[ "${try}" -eq 1 ]] && echo "note: another apt holds its lock; waiting for it" >&2
    sleep "${APT_LOCK_PAUSE_S}"
  done
  printf '%s\n' "${errors}" >&2
  return 1
}

ensure_service_active() {
  local unit="$1"
  if systemctl is-active --quiet "${unit}" && systemctl is-enabled --quiet "${unit}"; then
    report_ok "${unit} active and enabled"
    return 0
  fi
  report_change "${unit} enabled and started" || return 0
  systemctl enable --now --quiet "${unit}"
}

# -- the deploy target ------------------------------------------------------------------------
ensure_deploy_user() {
  if id "${DEPLOY_USER}" >/dev/null 2>&1; then
    report_ok "user ${DEPLOY_USER}"
  elif report_change "user ${DEPLOY_USER} created"; then
    useradd --create-home --shell /bin/bash "${DEPLOY_USER}"
  fi
  # Reads the app's database and logs for backups, through the app user's group.
  if id -nG "${DEPLOY_USER}" 2>/dev/null | tr ' ' '\n' | grep -qx "${APP_USER}"; then
    report_ok "${DEPLOY_USER} in group ${APP_USER}"
  elif report_change "${DEPLOY_USER} added to group ${APP_USER}"; then
    usermod -aG "${APP_USER}" "${DEPLOY_USER}"
  fi
}

deploy_home() {
  if id "${DEPLOY_USER}" >/dev/null 2>&1; then
    getent passwd "${DEPLOY_USER}" | cut -d: -f6
  else
    echo "/home/${DEPLOY_USER}"
  fi
}

# Everything in the deploy user's home is done as that user: a link it planted there (to
# /etc/shadow, say) leads nowhere its own rights do not already reach.
ensure_deploy_key() {
  local home keys exists=0
  home="$(deploy_home)"
  keys="${home}/.ssh/authorized_keys"
  id "${DEPLOY_USER}" >/dev/null 2>&1 && exists=1
  if [[ -z "${DEPLOY_PUBLIC_KEY}" ]]; then
    if [[ "${exists}" -eq 1 ]] && as_user "${DEPLOY_USER}" test -s "${keys}"; then
      report_ok "${keys} (no new key given)"
    else
      echo "note: no deploy key given; add one with --deploy-key-file (see README, SSH keys)"
    fi
    return 0
  fi
  if [[ "${exists}" -eq 1 ]] \
    && as_user "${DEPLOY_USER}" grep -qxF -- "${DEPLOY_PUBLIC_KEY}" "${keys}" 2>/dev/null; then
    report_ok "deploy key in ${keys}"
  elif report_change "deploy key added to ${keys}"; then
    # shellcheck disable=SC2016 # $1 and $2 belong to the inner sh, not to this script
    printf '%s\n' "${DEPLOY_PUBLIC_KEY}" | as_user "${DEPLOY_USER}" sh -c \
      'umask 077 && mkdir -p "$1" && chmod 700 "$1" && cat >> "$2" && chmod 600 "$2"' \
      sh "${home}/.ssh" "${keys}" || die "could not add the deploy key to ${keys} as" \
      "${DEPLOY_USER} (is it a link or not writable?)"
  fi
}

ensure_sudoers() {
  ensure_template sudoers "/etc/sudoers.d/${SUDOERS_NAME}" 440 root root visudo -cqf
  remove_python_rule
}

# Older setups installed a sudo rule for `sudo -u www-data DEPLOY_PATH/venv/bin/python --version`
# bound to python3's sha256, and an apt hook renewing it. sudo checks the digest and then runs
# the file, which the deploy user owns and can rewrite in between: a program of its choice ran
# as the app user, outside the app's sandbox. The rule, its tool and the hook are removed.
remove_python_rule() {
  local file found=()
  for file in "/etc/sudoers.d/${SUDOERS_NAME}-python" \
    "/usr/local/sbin/${SUDOERS_NAME}-python-rule" \
    "/etc/apt/apt.conf.d/80${SUDOERS_NAME}-python-rule"; do
    if [[ -e "${file}" || -L "${file}" ]]; then
      found+=("${file}")
    fi
  done
  if [[ "${#found[@]}" -eq 0 ]]; then
    report_ok "no sudo rule runs a program as ${APP_USER}"
  elif report_change "removed ${found[*]} (sudo ran a file deploy can rewrite as ${APP_USER})"; then
    rm -f "${found[@]}"
  fi
}

ensure_directories() {
  ensure_safe dir "${DEPLOY_PATH}" "${DEPLOY_USER}" "${APP_USER}" 750
  # setgid: what the deploy user unpacks or builds here belongs to the app's group, which
  # reads it; the app writes none of it.
  ensure_safe dir "${DEPLOY_PATH}/releases" "${DEPLOY_USER}" "${APP_USER}" 2750
  ensure_safe dir "${DEPLOY_PATH}/shared" "${DEPLOY_USER}" "${APP_USER}" 750
  ensure_safe dir "${DEPLOY_PATH}/shared/venvs" "${DEPLOY_USER}" "${APP_USER}" 2750
  # The deploys' own backups stay the deploy user's; the timer's live under data_path.
  ensure_safe dir "${BACKUP_PATH}" "${DEPLOY_USER}" "${APP_USER}" 710
  ensure_app_data
  ensure_log_folder
  ensure_venv_link
}

# The app's logs: a folder only root writes, holding files the app owns. The app appends to
# them; nobody but root can put a link or another file there, so `sudo tail` of the guide reads
# the app's own log and nothing else. logrotate rotates it as root (see conf/logrotate.conf).
ensure_log_folder() {
  local removed name
  ensure_safe dir "${LOG_PATH}" root root 755
  if [[ "${MODE}" == "apply" ]]; then
    removed="$(safe_path clean "${LOG_PATH}")" || exit 1
    if [[ -n "${removed}" ]]; then
      report_change "removed links and non-files from ${LOG_PATH}: ${removed}"
    fi
  fi
  for name in app.log error.log; do
    ensure_safe file "${LOG_PATH}/${name}" "${APP_USER}" "${APP_USER}" 640
  done
}

# -- the app's data: under a folder only root writes (R20) --------------------------------------
# systemd (root) opens the units' ReadWritePaths= and follows a link there: a data folder in a
# folder the deploy user owns could be swapped for a link to /etc, which the app could then
# write. So the app's database, uploads and the timer's backups live under /var/lib/<service>
# (root, 755), where only root can rename or replace them. The old places (shared/instance,
# shared/uploads, BACKUP_PATH/scheduled) become links the deploy user owns: releases,
# the server tool and people's habits keep working through them, and root never follows them.
data_path() {
  echo "/var/lib/${SERVICE_NAME}"
}

ensure_app_data() {
  local data
  data="$(data_path)"
  ensure_safe dir "${data}" root root 755
  move_app_data "${DEPLOY_PATH}/shared/instance" "${data}/instance"
  move_app_data "${DEPLOY_PATH}/shared/uploads" "${data}/uploads"
  move_app_data "${BACKUP_PATH}/scheduled" "${data}/backups"
  # The app writes only here (setgid keeps the group on new files).
  ensure_safe dir "${data}/instance" "${APP_USER}" "${APP_USER}" 2770
  ensure_safe dir "${data}/uploads" "${APP_USER}" "${APP_USER}" 2770
  # The backup timer writes here as the app user; the deploy user lists and restores them.
  ensure_safe dir "${data}/backups" "${APP_USER}" "${DEPLOY_USER}" 2750
  ensure_data_link "${DEPLOY_PATH}/shared/instance" "${data}/instance"
  ensure_data_link "${DEPLOY_PATH}/shared/uploads" "${data}/uploads"
  ensure_data_link "${BACKUP_PATH}/scheduled" "${data}/backups"
}

# move_app_data OLD NEW: a server set up before keeps its data: OLD moves to NEW once (one
# rename, the app's requests held; on another filesystem a copy with the app stopped).
move_app_data() {
  local old="$1" new="$2" state
  if [[ "${MODE}" == "check" ]]; then
    if [[ -d "${old}" && ! -L "${old}" ]]; then
      report_change "${old}/ moved to ${new}/" || true
    fi
    return 0
  fi
  state="$(safe_path move "${old}" "${new}" "${DEPLOY_PATH}/shared/write-gate")" || exit 1
  case "${state}" in
    moved) report_change "${old}/ moved to ${new}/" ;;
    copy) copy_app_data "${old}" "${new}" ;;
  esac
}

# Another filesystem: no rename keeps the running app's files, so the app stops (its socket
# too: systemd would start it again on a request) while its own user copies its files, which
# keeps them out of root's hands. Requests are refused for that time.
copy_app_data() {
  local old="$1" new="$2" running=0 owner
  report_change "${old}/ copied to ${new}/ (another filesystem; the app stops meanwhile)"
  if systemctl is-active --quiet "${SERVICE_NAME}.socket"; then
    running=1
    systemctl stop "${SERVICE_NAME}.socket" "${SERVICE_NAME}.service"
  fi
  owner="$(stat -c %U "${old}")"
  [[ "${owner}" == "${APP_USER}" ]] || die "${old} belongs to ${owner}, not ${APP_USER}; move" \
    "its files to ${new} by hand and run again"
  ensure_safe dir "${new}" "${APP_USER}" "${APP_USER}" 2770
  as_user "${APP_USER}" cp -a --no-dereference -T "${old}" "${new}" \
    || die "could not copy ${old} to ${new} as ${APP_USER}; nothing was removed"
  as_user "${DEPLOY_USER}" rm -rf "${old}"
  if [[ "${running}" -eq 1 ]]; then
    systemctl start "${SERVICE_NAME}.socket"
  fi
}

# ensure_data_link LINK TARGET: made by the deploy user, in its own folder.
ensure_data_link() {
  local link="$1" target="$2"
  if [[ -L "${link}" && "$(readlink "${link}")" == "${target}" ]]; then
    report_ok "${link} -> ${target}"
  elif [[ -e "${link}" && ! -L "${link}" ]] && [[ "${MODE}" == "apply" ]]; then
    die "${link} is not a link; move its files to ${target} and run again"
  elif report_change "${link} -> ${target}"; then
    as_user "${DEPLOY_USER}" ln -sfnT "${target}" "${link}"
  fi
}

# The guide's troubleshooting runs DEPLOY_PATH/venv/bin/python: venv -> current/.venv, made
# by the deploy user in its own folder.
ensure_venv_link() {
  local link="${DEPLOY_PATH}/venv"
  if [[ -L "${link}" && "$(readlink "${link}")" == "current/.venv" ]]; then
    report_ok "${link} -> current/.venv"
  elif report_change "${link} -> current/.venv"; then
    as_user "${DEPLOY_USER}" ln -sfnT current/.venv "${link}"
  fi
}

# The app's environment (SECRET_KEY...), read by systemd as root: a file the deploy user owns
# and writes, in a folder only root writes, so it cannot be swapped for a link. A server set up
# before keeps its shared/.env: the deploy user's own rights copy it over once.
ensure_app_env_file() {
  local env_file="/etc/${SERVICE_NAME}/app.env" old="${DEPLOY_PATH}/shared/.env"
  if [[ -f "${env_file}" && ! -L "${env_file}" \
    && "$(stat -c '%a %U' "${env_file}")" == "600 ${DEPLOY_USER}" ]]; then
    report_ok "${env_file}"
    return 0
  fi
  report_change "${env_file} (${DEPLOY_USER} 600, the app's environment)" || return 0
  if [[ -f "${env_file}" && ! -L "${env_file}" ]]; then
    chown "${DEPLOY_USER}:${DEPLOY_USER}" "${env_file}"
    chmod 600 "${env_file}"
    return 0
  fi
  rm -f "${env_file}"
  install -m 600 -o "${DEPLOY_USER}" -g "${DEPLOY_USER}" /dev/null "${env_file}"
  if as_user "${DEPLOY_USER}" test -f "${old}"; then
    as_user "${DEPLOY_USER}" cat "${old}" > "${env_file}"
    as_user "${DEPLOY_USER}" rm -f "${old}"
    echo "note: ${old} moved to ${env_file}"
  fi
}

ensure_app_units() {
  local changed=0 unit
  for unit in "app.service:${SERVICE_NAME}.service" "app.socket:${SERVICE_NAME}.socket" \
    "app-migrate.service:${SERVICE_NAME}-migrate.service" \
    "app-preflight.service:${SERVICE_NAME}-preflight.service" \
    "app-backup.service:${SERVICE_NAME}-backup.service" \
    "app-backup.timer:${SERVICE_NAME}-backup.timer"; do
    ensure_template "${unit%%:*}" "/etc/systemd/system/${unit#*:}" 644 root root
    changed=$((changed + FILE_CHANGED))
  done
  ensure_dir "/etc/${SERVICE_NAME}" root root 755
  ensure_app_env_file
  ensure_template gunicorn.conf.py "/etc/${SERVICE_NAME}/gunicorn.conf.py" 644 root root
  changed=$((changed + FILE_CHANGED))
  if [[ "${changed}" -gt 0 && "${MODE}" == "apply" ]]; then
    systemctl daemon-reload
  fi
  if systemctl is-enabled --quiet "${SERVICE_NAME}.socket" \
    && systemctl is-enabled --quiet "${SERVICE_NAME}.service"; then
    report_ok "${SERVICE_NAME}.socket and .service enabled"
  elif report_change "${SERVICE_NAME}.socket and .service enabled"; then
    systemctl enable --quiet "${SERVICE_NAME}.socket" "${SERVICE_NAME}.service"
  fi
  if systemctl is-enabled --quiet "${SERVICE_NAME}-backup.timer" \
    && systemctl is-active --quiet "${SERVICE_NAME}-backup.timer"; then
    report_ok "${SERVICE_NAME}-backup.timer enabled (${BACKUP_SCHEDULE})"
  elif report_change "${SERVICE_NAME}-backup.timer enabled (${BACKUP_SCHEDULE})"; then
    systemctl enable --now --quiet "${SERVICE_NAME}-backup.timer"
  fi
  # Until the first deploy there is nothing to serve; deploys start the service themselves.
  if [[ -e "${DEPLOY_PATH}/current" && "${changed}" -gt 0 && "${MODE}" == "apply" ]]; then
    systemctl restart "${SERVICE_NAME}.service"
  fi
}

# `doit run` and the app's deploy hooks: root's own runner, which the deploy user may run with
# sudo, starts a command as the app user in the service's sandbox (conf/app-run.py). The
# hardening is written into it here, so it reads nothing the deploy user or the app can write.
ensure_app_runner() {
  ensure_template app-run.py "/usr/local/sbin/${SERVICE_NAME}-run" 755 root root \
    python3 -I -S -c 'import sys; compile(open(sys.argv[1]).read(), sys.argv[1], "exec")'
}

ensure_nginx_site() {
  local available="/etc/nginx/sites-available/${SITE_NAME}"
  local enabled="/etc/nginx/sites-enabled/${SITE_NAME}"
  local changed=0 previous=""
  if [[ -f "${available}" ]]; then
    previous="$(mktemp)"
    cp -p "${available}" "${previous}"
  fi
  ensure_dir /etc/nginx/snippets root root 755
  ensure_template nginx-maintenance.conf "/etc/nginx/snippets/${SITE_NAME}-maintenance.conf" \
    644 root root
  changed=$((changed + FILE_CHANGED))
  ensure_template nginx-site.conf "${available}" 644 root root
  changed=$((changed + FILE_CHANGED))
  if [[ -L "${enabled}" && "$(readlink "${enabled}")" == "${available}" ]]; then
    report_ok "${enabled} enabled"
  elif report_change "${enabled} enabled"; then
    ln -sfn "${available}" "${enabled}"
    changed=1
  fi
  # Debian's default site also claims default_server on port 80.
  if [[ -e /etc/nginx/sites-enabled/default ]]; then
    if report_change "nginx default site disabled"; then
      rm -f /etc/nginx/sites-enabled/default
      changed=1
    fi
  else
    report_ok "nginx default site disabled"
  fi
  if [[ "${changed}" -gt 0 && "${MODE}" == "apply" ]]; then
    if ! nginx -t >/dev/null 2>&1; then
      if [[ -n "${previous}" ]]; then
        cp -p "${previous}" "${available}"
      else
        rm -f "${enabled}"
      fi
      die "nginx -t fails with the new site; the previous configuration was restored" \
        "(run nginx -t to see why)"
    fi
    systemctl reload-or-restart nginx
  fi
  rm -f "${previous}"
  ensure_service_active nginx
}

ensure_logrotate() {
  ensure_template logrotate.conf "/etc/logrotate.d/${SITE_NAME}" 644 root root \
    logrotate --debug
}

ensure_fail2ban() {
  ensure_template fail2ban-sshd.local /etc/fail2ban/jail.d/sshd-journald.local 644 root root
  if [[ "${FILE_CHANGED}" -eq 1 && "${MODE}" == "apply" ]]; then
    systemctl restart fail2ban
  fi
  ensure_service_active fail2ban
}

# ufw_has_rule PORT STATUS: STATUS is `ufw status verbose` output (ufw is slow to ask).
ufw_has_rule() {
  grep -Eq "^$1/tcp +ALLOW IN +Anywhere( |$)" <<<"$2"
}

# -- SSH ports: the firewall never shuts SSH out -----------------------------------------------
# SSH_PORT is the port a client dials; a forward or NAT may end elsewhere, and sshd may listen
# on more. So the firewall keeps open SSH_PORT, every port `sshd -T` says sshd listens on, and
# the port this very session came in on (SSH_CONNECTION, carried through sudo as a flag).
session_ssh_port() {
  local fields=()
  if [[ -n "${SESSION_SSH_PORT}" ]]; then
    echo "${SESSION_SSH_PORT}"
  elif read -r -a fields <<<"${SSH_CONNECTION:-}" && [[ "${#fields[@]}" -eq 4 ]]; then
    echo "${fields[3]}"
  fi
}

sshd_ports() {
  # `port 2222`, and `listenaddress [::]:2222` / `0.0.0.0:2222` (the port after the last ':').
  sshd -T 2>/dev/null | awk '$1 == "port" { print $2 }
    $1 == "listenaddress" { n = split($2, part, ":"); print part[n] }' || true
}

find_ssh_ports() {
  local port ports=()
  for port in "${SSH_PORT}" $(sshd_ports) "$(session_ssh_port)"; do
    [[ "${port}" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) && ports+=("${port}")
  done
  SSH_PORTS="$(printf '%s\n' "${ports[@]}" | sort -nu | paste -sd, -)"
}

ensure_firewall() {
  local port verbose session
  verbose="$(ufw status verbose 2>/dev/null || true)"
  [[ -n "${SSH_PORTS}" ]] || find_ssh_ports
  for port in ${SSH_PORTS//,/ } 80 443; do
    if ufw_has_rule "${port}" "${verbose}"; then
      report_ok "ufw allows ${port}/tcp"
    elif report_change "ufw allows ${port}/tcp"; then
      ufw allow "${port}/tcp" >/dev/null
    fi
  done
  if grep -q "^Status: active" <<<"${verbose}" \
    && grep -q "Default: deny (incoming)" <<<"${verbose}"; then
    report_ok "ufw active, incoming denied by default (${APP_PORT} stays closed)"
  elif report_change "ufw active, incoming denied by default"; then
    # Never enable a firewall that would cut this session: its port must be allowed by now.
    session="$(session_ssh_port)"
    if [[ -n "${session}" ]] && ! ufw_has_rule "${session}" "$(ufw show added 2>/dev/null \
      | sed -n 's|^ufw allow \([0-9]*\)/tcp$|\1/tcp ALLOW IN Anywhere|p')"; then
      die "ufw would shut out this SSH session (port ${session}); it was not enabled"
    fi
    ufw default deny incoming >/dev/null
    ufw default allow outgoing >/dev/null
    ufw --force enable >/dev/null
  fi
}

# -- HTTPS: a Let's Encrypt certificate by HTTP-01 (webroot), port 443, renewal --------------
https_flags() {
  local flags=(--acme-server "${ACME_SERVER}")
  [[ "${HTTPS}" -ne 1 ]] || flags+=(--https)
  [[ -z "${LETSENCRYPT_EMAIL}" ]] || flags+=(--letsencrypt-email "${LETSENCRYPT_EMAIL}")
  [[ -z "${ACME_CA_BUNDLE}" ]] || flags+=(--acme-ca-bundle "${ACME_CA_BUNDLE}")
  [[ "${HSTS}" -ne 1 ]] || flags+=(--hsts)
  printf '%s\0' "${flags[@]}"
}

validate_https_settings() {
  [[ "${HTTPS}" =~ ^[01]$ ]] || die "HTTPS=${HTTPS} must be 1 or 0"
  [[ "${HSTS}" =~ ^[01]$ ]] || die "HSTS=${HSTS} must be 1 or 0"
  [[ "${HTTPS}" -eq 1 ]] || return 0
  if [[ "${SERVER_NAME}" == "_" || "${SERVER_NAME}" == *"*"* ]]; then
    die "HTTPS=1 needs SERVER_NAME (--server-name) set to your domain, without _ or" \
      "wildcards: the certificate names it"
  fi
  [[ -n "${LETSENCRYPT_EMAIL}" ]] || die "HTTPS=1 needs LETSENCRYPT_EMAIL" \
    "(--letsencrypt-email): the ACME account's address, for expiry notices"
  [[ "${LETSENCRYPT_EMAIL}" =~ ^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$ ]] \
    || die "LETSENCRYPT_EMAIL=${LETSENCRYPT_EMAIL} is not an email address"
  [[ "${ACME_SERVER}" =~ ^https://[A-Za-z0-9.:_-]+(/[A-Za-z0-9._~/-]*)?$ ]] \
    || die "ACME_SERVER=${ACME_SERVER} must be the https:// URL of an ACME directory"
  if [[ -n "${ACME_CA_BUNDLE}" && ! ( -f "${ACME_CA_BUNDLE}" && -r "${ACME_CA_BUNDLE}" ) ]]; then
    die "ACME_CA_BUNDLE=${ACME_CA_BUNDLE}: cannot read it"
  fi
}

certificate_file() { echo "${LETSENCRYPT_DIR}/live/${SITE_NAME}/fullchain.pem"; }

certificate_present() {
  [[ -s "$(certificate_file)" && -s "${LETSENCRYPT_DIR}/live/${SITE_NAME}/privkey.pem" ]]
}

# Whole days until the certificate in $1 expires (negative: expired).
certificate_days_left() {
  local end
  end="$(openssl x509 -noout -enddate -in "$1" 2>/dev/null)" || return 1
  echo $(( ($(date -d "${end#notAfter=}" +%s) - $(date +%s)) / 86400 ))
}

# Whether the certificate in $1 names every name of SERVER_NAME.
certificate_covers() {
  local names=() name listed
  read -ra names <<<"${SERVER_NAME}"
  listed="$(openssl x509 -noout -ext subjectAltName -in "$1" 2>/dev/null | tr -s ', ' '\n')" \
    || return 1
  for name in "${names[@]}"; do
    grep -qixF "DNS:${name}" <<<"${listed}" || return 1
  done
}

# The nginx lines that @HTTPS@ in nginx-site.conf stands for: the challenge location once
# HTTPS=1, port 443 (and the redirect) once a certificate is there.
render_https_block() {
  [[ "${HTTPS}" -eq 1 ]] || return 0
  render_values nginx-acme-challenge.conf
  certificate_present || return 0
  render_values nginx-https.conf
  [[ "${HSTS}" -ne 1 ]] || render_values nginx-hsts.conf
}

ensure_https_tools() {
  [[ "${HTTPS}" -eq 1 ]] || return 0
  ensure_packages certbot openssl
  ensure_safe dir "${ACME_WEBROOT}" root root 755
  ensure_dir "${LETSENCRYPT_DIR}/renewal-hooks/deploy" root root 755
  ensure_template certbot-deploy-hook.sh \
    "${LETSENCRYPT_DIR}/renewal-hooks/deploy/${SITE_NAME}-nginx-reload" 755 root root
  ensure_acme_ca
  ensure_service_active certbot.timer
}

# A custom ACME server (pebble in the tests, a company CA) may use a TLS certificate that the
# system does not trust: its CA goes to a root-owned file, which certbot's renewals read too.
ensure_acme_ca() {
  local dropin=/etc/systemd/system/certbot.service.d/acme-ca.conf
  if [[ -n "${ACME_CA_BUNDLE}" ]]; then
    ensure_file "${ACME_CA_FILE}" 644 root root "${ACME_CA_BUNDLE}"
    ensure_dir /etc/systemd/system/certbot.service.d root root 755
    ensure_template certbot-acme-ca.conf "${dropin}" 644 root root
    if [[ "${FILE_CHANGED}" -eq 1 && "${MODE}" == "apply" ]]; then
      systemctl daemon-reload
    fi
  elif [[ -e "${dropin}" || -e "${ACME_CA_FILE}" ]]; then
    if report_change "removed ${dropin} and ${ACME_CA_FILE} (no ACME_CA_BUNDLE)"; then
      rm -f "${dropin}" "${ACME_CA_FILE}"
      systemctl daemon-reload
    fi
  fi
}

ensure_certificate() {
  [[ "${HTTPS}" -eq 1 ]] || return 0
  local days
  if certificate_present && certificate_covers "$(certificate_file)" \
    && days="$(certificate_days_left "$(certificate_file)")" && (( days > 0 )); then
    report_ok "certificate for ${SERVER_NAME} expires in ${days} days (certbot.timer renews it)"
    return 0
  fi
  report_change "certificate for ${SERVER_NAME} from ${ACME_SERVER}" || return 0
  obtain_certificate
  ensure_nginx_site  # now with port 443 and the redirect
}

obtain_certificate() {
  local names=() name domains=() ca_env=() cacert=() reason output status=0
  read -ra names <<<"${SERVER_NAME}"
  for name in "${names[@]}"; do
    domains+=(-d "${name}")
  done
  if [[ -n "${ACME_CA_BUNDLE}" ]]; then
    ca_env=("REQUESTS_CA_BUNDLE=${ACME_CA_FILE}")
    cacert=(--cacert "${ACME_CA_FILE}")
  fi
  # Asked first with a short timeout: an unreachable ACME server is one line, port 80 unchanged.
  if ! reason="$(curl -sS -o /dev/null --max-time 15 "${cacert[@]}" "${ACME_SERVER}" 2>&1)"; then
    die "HTTPS: the ACME server ${ACME_SERVER} cannot be reached (${reason#curl: });" \
      "the site keeps serving HTTP; check ACME_SERVER and this server's outgoing HTTPS"
  fi
  output="$(mktemp)"
  env "${ca_env[@]}" timeout "${ACME_TIMEOUT_S}" certbot certonly --non-interactive \
    --agree-tos --email "${LETSENCRYPT_EMAIL}" --no-eff-email --server "${ACME_SERVER}" \
    --webroot -w "${ACME_WEBROOT}" --cert-name "${SITE_NAME}" --keep-until-expiring \
    "${domains[@]}" >"${output}" 2>&1 || status=$?
  if [[ "${status}" -ne 0 ]]; then
    reason="$(acme_error "${output}" "${status}")"
    rm -f "${output}"
    die "HTTPS: no certificate for ${SERVER_NAME}: ${reason}; make sure the name points at" \
      "this server and port 80 is open; the site keeps serving HTTP (details:" \
      "/var/log/letsencrypt/letsencrypt.log)"
  fi
  rm -f "${output}"
}

# certbot's failure in one line: the ACME server's own words (its `Detail:`) when it gave any.
acme_error() {
  local output="$1" status="$2" detail
  if [[ "${status}" -eq 124 ]]; then
    echo "certbot had no answer within ${ACME_TIMEOUT_S} s"
    return 0
  fi
  detail="$(sed -n 's/^ *Detail: *//p' "${output}" | head -n 1)"
  if [[ -z "${detail}" ]]; then
    detail="$(grep -iE 'error|fail' "${output}" | head -n 1 || true)"
  fi
  echo "${detail:-certbot exited with status ${status}}"
}

# The deploy key works when the caller says so (doit setup logs in with it first) or when sshd
# logged a key login of the deploy user. Only a whole message counts: sshd logs the user names
# it is sent, so anyone reaching port 22 as user `Accepted publickey for deploy from` writes
# that text into its log, in the middle of a line of its own (R23).
deploy_key_proven() {
  [[ "${DEPLOY_KEY_VERIFIED}" -eq 1 ]] && return 0
  # grep reads all of it: with pipefail, grep -q would make journalctl die of SIGPIPE.
  journalctl -u ssh -u sshd --no-pager -q -o cat 2>/dev/null \
    | grep -E "^Accepted publickey for ${DEPLOY_USER} from [0-9A-Fa-f.:]+ port [0-9]+ " \
      >/dev/null
}

# Root login is closed only when another way in with sudo remains (an admin user with a key).
admin_login_remains() {
  local member home
  for member in $(getent group sudo | cut -d: -f4 | tr ',' ' '); do
    [[ "${member}" != "${DEPLOY_USER}" ]] || continue
    home="$(getent passwd "${member}" | cut -d: -f6)"
    [[ -s "${home}/.ssh/authorized_keys" ]] && return 0
  done
  return 1
}

ensure_ssh_hardening() {
  if ! deploy_key_proven; then
    # An earlier run hardened SSH (the journal that proved the key may be gone since).
    [[ ! -f "${SSH_HARDENING_FILE}" ]] || SSH_HARDENING="applied"
    echo "note: SSH hardening waits until the deploy key has logged in once (ssh" \
      "${DEPLOY_USER}@this-server), then run this again; passwords stay allowed until then"
    return 0
  fi
  PERMIT_ROOT_LOGIN="no"
  if ! admin_login_remains; then
    PERMIT_ROOT_LOGIN="prohibit-password"
    echo "note: root keeps key-only login: no other user with sudo has an SSH key"
  fi
  SSH_HARDENING="applied"
  ensure_template sshd-hardening.conf "${SSH_HARDENING_FILE}" 644 root root
  if [[ "${FILE_CHANGED}" -eq 1 && "${MODE}" == "apply" ]]; then
    if ! sshd -t; then
      rm -f "${SSH_HARDENING_FILE}"
      die "sshd -t fails with the hardening; it was removed again"
    fi
    systemctl reload ssh
  fi
}

# >>> embedded templates: GENERATED from conf/ by `python -m scripts.embed_templates`.
# Edit conf/, not these lines; the script uses them when no conf/ is beside it.
embedded_template_names() {
  echo app-backup.service
  echo app-backup.timer
  echo app-migrate.service
  echo app-preflight.service
  echo app-run.py
  echo app.service
  echo app.socket
  echo certbot-acme-ca.conf
  echo certbot-deploy-hook.sh
  echo fail2ban-sshd.local
  echo gunicorn.conf.py
  echo hardening.conf
  echo logrotate.conf
  echo nginx-acme-challenge.conf
  echo nginx-hsts.conf
  echo nginx-https.conf
  echo nginx-maintenance.conf
  echo nginx-site.conf
  echo sshd-hardening.conf
  echo sudoers
}

embedded_template() {
  case "$1" in
    app-backup.service)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/systemd/system/@SERVICE_NAME@-backup.service
# A scheduled backup of the app's database (SQLite's online backup API) into
# @DATA_PATH@/backups (BACKUP_PATH/scheduled links there), as the app user, with the deploys'
# retention; started by @SERVICE_NAME@-backup.timer. The server tool is the one the last
# deploy installed.
[Unit]
Description=@SERVICE_NAME@: scheduled database backup into @DATA_PATH@/backups
ConditionPathExists=@DEPLOY_PATH@/.deploy-tool/server_tool.py

[Service]
Type=oneshot
User=@APP_USER@
Group=@APP_USER@
ExecStart=/usr/bin/python3 -I -S @DEPLOY_PATH@/.deploy-tool/server_tool.py backup @DEPLOY_PATH@ @DATA_PATH@/backups scheduled @BACKUPS_KEEP@ @BACKUPS_KEEP_DAYS@
@HARDENING@
ReadWritePaths=@DATA_PATH@/backups
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    app-backup.timer)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/systemd/system/@SERVICE_NAME@-backup.timer
# Scheduled database backups (BACKUP_SCHEDULE, a systemd OnCalendar value; daily by default).
[Unit]
Description=@SERVICE_NAME@: scheduled database backups (@BACKUP_SCHEDULE@)

[Timer]
OnCalendar=@BACKUP_SCHEDULE@
RandomizedDelaySec=10min
Persistent=true

[Install]
WantedBy=timers.target
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    app-migrate.service)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/systemd/system/@SERVICE_NAME@-migrate.service
# Runs the database migrations of the release being deployed (DEPLOY_PATH/next) as the app user.
[Unit]
Description=@SERVICE_NAME@: migrations of @DEPLOY_PATH@/next

[Service]
Type=oneshot
User=@APP_USER@
Group=@APP_USER@
WorkingDirectory=@DEPLOY_PATH@/next
# Read by systemd as root: a file in a folder only root writes (server_setup.sh).
EnvironmentFile=-/etc/@SERVICE_NAME@/app.env
Environment=APP_LOG_DIR=@LOG_PATH@ PATH=@DEPLOY_PATH@/next/.venv/bin:/usr/bin:/bin
# The command (MIGRATE_COMMAND) comes with each deploy, in the release: the deploy user chooses
# what runs here, as the app user, as it chooses the app's own code.
ExecStart=/bin/sh @DEPLOY_PATH@/next/.migrate-command
# SQLite creates files 0644 & ~UMask = 0640; the deploy user's backups need group write (their
# -wal/-shm files copy the database's mode), so open the app's data files to the group.
ExecStartPost=-@OPEN_DATA_TO_GROUP@
TimeoutStartSec=300
@HARDENING@
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    app-preflight.service)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/systemd/system/@SERVICE_NAME@-preflight.service
# The release being deployed (DEPLOY_PATH/next) on a spare loopback port, so its health is
# proven before any user request reaches it.
[Unit]
Description=@SERVICE_NAME@: preflight of @DEPLOY_PATH@/next on 127.0.0.1:@PREFLIGHT_PORT@

[Service]
Type=notify
User=@APP_USER@
Group=@APP_USER@
WorkingDirectory=@DEPLOY_PATH@/next
# Read by systemd as root: a file in a folder only root writes (server_setup.sh).
EnvironmentFile=-/etc/@SERVICE_NAME@/app.env
Environment=APP_LOG_DIR=@LOG_PATH@
ExecStart=@DEPLOY_PATH@/next/.venv/bin/gunicorn --config /etc/@SERVICE_NAME@/gunicorn.conf.py --bind 127.0.0.1:@PREFLIGHT_PORT@ --workers 1 wsgi:app
TimeoutStartSec=60
KillMode=mixed
@HARDENING@
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    app-run.py)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
#!/usr/bin/python3 -IS
# Installed by server_setup.sh as /usr/local/sbin/@SERVICE_NAME@-run (root, 0755); the deploy
# user runs it with sudo (conf/sudoers) for `doit run` and the app's deploy hooks.
#
# It starts one command as @APP_USER@ in the app's own sandbox: `systemd-run` with the very
# hardening of @SERVICE_NAME@.service (embedded below when setup rendered this file, never read
# from a path the deploy user or the app can write), the app's environment, its venv on PATH and
# a release folder as working directory. The deploy user chooses the command, as it chooses the
# app's code; it chooses nothing else: not the user, not a property, not a path root opens.
#
#   @SERVICE_NAME@-run --pty|--pipe current|RELEASE -- COMMAND [ARG...]
#
# current: the live release (`doit run`); RELEASE: releases/RELEASE, the one being deployed (its
# deploy hooks). Root opens neither: systemd enters the folder as the app user.
# --pty: a terminal in the sandbox (ssh -t); --pipe: plain stdin/stdout/stderr. The exit status
# is the command's.
import os
import pwd
import re
import sys

APP_USER = "@APP_USER@"
DEPLOY_PATH = "@DEPLOY_PATH@"
ENV_FILE = "/etc/@SERVICE_NAME@/app.env"
LOG_PATH = "@LOG_PATH@"
HARDENING = """
@HARDENING@
"""
USAGE = "usage: @SERVICE_NAME@-run --pty|--pipe current|RELEASE -- COMMAND [ARG...]"
RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a name, never a path


def properties(text: str) -> list[str]:
    """The unit's hardening lines as systemd-run properties (comments and blanks dropped)."""
    lines = (line.strip() for line in text.splitlines())
    return [f"--property={line}" for line in lines if line and not line.startswith("#")]


def literal(arg: str) -> str:
    """systemd expands $NAME in a command line; $$ is its literal dollar sign."""
    return arg.replace("$", "$$")


def argv_for(mode: str, release: str, command: list[str], uid: int, gid: int) -> list[str]:
    folder = f"{DEPLOY_PATH}/current" if release == "current" else \
        f"{DEPLOY_PATH}/releases/{release}"
    return ["/usr/bin/systemd-run", "--quiet", "--collect", "--wait", mode,
            "--service-type=exec", f"--description=@SERVICE_NAME@-run in {folder}",
            f"--uid={uid}", f"--gid={gid}", f"--working-directory={folder}",
            # Read by systemd as root, as for the service: a file in a folder only root writes.
            f"--property=EnvironmentFile=-{ENV_FILE}",
            f"--setenv=APP_LOG_DIR={LOG_PATH}",
            f"--setenv=PATH={folder}/.venv/bin:/usr/bin:/bin",
            *properties(HARDENING),
            # env finds the command on PATH as the app user, inside the sandbox.
            "--", "/usr/bin/env", "--", *map(literal, command)]


def main(args: list[str]) -> int:
    if len(args) < 4 or args[0] not in ("--pty", "--pipe") \
            or not RELEASE.fullmatch(args[1]) or args[2] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        user = pwd.getpwnam(APP_USER)
    except KeyError:
        print(f"error: the app user {APP_USER} does not exist", file=sys.stderr)
        return 2
    if user.pw_uid == 0 or user.pw_gid == 0:
        print(f"error: refusing to run as root: the app user {APP_USER} is root",
              file=sys.stderr)
        return 2
    command = args[3:]
    os.execv("/usr/bin/systemd-run", argv_for(args[0], args[1], command, user.pw_uid,
                                               user.pw_gid))
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    app.service)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/systemd/system/@SERVICE_NAME@.service
# gunicorn serving DEPLOY_PATH/current. The listening socket belongs to @SERVICE_NAME@.socket,
# so during a restart new connections wait in its queue instead of being refused.
[Unit]
Description=@SERVICE_NAME@: gunicorn serving @DEPLOY_PATH@/current
Requires=@SERVICE_NAME@.socket
After=network.target @SERVICE_NAME@.socket
# Before the first deploy there is nothing to run: skip, instead of failing in a loop.
ConditionPathExists=@DEPLOY_PATH@/current

[Service]
Type=notify
# Only the main process is heard: it names the master it hands over to (gunicorn.conf.py). A
# worker must not: systemd would watch a process it names without noticing its end.
NotifyAccess=main
User=@APP_USER@
Group=@APP_USER@
WorkingDirectory=@DEPLOY_PATH@/current
# Read by systemd as root: a file in a folder only root writes (server_setup.sh).
EnvironmentFile=-/etc/@SERVICE_NAME@/app.env
Environment=APP_LOG_DIR=@LOG_PATH@
ExecStartPre=-@OPEN_DATA_TO_GROUP@
ExecStart=@DEPLOY_PATH@/current/.venv/bin/gunicorn --config /etc/@SERVICE_NAME@/gunicorn.conf.py wsgi:app
ExecReload=/bin/kill -s HUP $MAINPID
KillMode=mixed
TimeoutStopSec=30
Restart=on-failure
RestartSec=2
@HARDENING@

[Install]
WantedBy=multi-user.target
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    app.socket)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/systemd/system/@SERVICE_NAME@.socket
# systemd holds 127.0.0.1:@APP_PORT@ open across restarts of @SERVICE_NAME@.service.
[Unit]
Description=@SERVICE_NAME@: listening socket on 127.0.0.1:@APP_PORT@

[Socket]
ListenStream=127.0.0.1:@APP_PORT@
Backlog=2048
NoDelay=true

[Install]
WantedBy=sockets.target
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    certbot-acme-ca.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh when ACME_SERVER is not Let's Encrypt and ACME_CA_BUNDLE names
# the CA of its TLS listener: certbot's renewals (certbot.timer) trust that CA for it.
[Service]
Environment=REQUESTS_CA_BUNDLE=@ACME_CA_FILE@
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    certbot-deploy-hook.sh)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
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
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    fail2ban-sshd.local)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/fail2ban/jail.d/sshd-journald.local
# Debian 12 logs sshd to journald only (no /var/log/auth.log), so the jail reads the journal.
[sshd]
enabled = true
backend = systemd
port = @SSH_PORTS@
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    gunicorn.conf.py)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
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
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    hardening.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Sandboxing shared by the app's units (systemd-analyze security scores it; see README).
UMask=0007
NoNewPrivileges=yes
ProtectSystem=strict
# Only folders under one only root writes: systemd follows a link here, as root (R20).
ReadWritePaths=@DATA_PATH@/instance -@DATA_PATH@/uploads @LOG_PATH@
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
DevicePolicy=closed
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    logrotate.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/logrotate.d/@SITE_NAME@
# The app reopens its files after rotation (WatchedFileHandler); nginx's logs rotate with nginx.
# The folder belongs to root (the app owns only its files), so logrotate rotates as root and no
# link can be planted there for it to follow.
@LOG_PATH@/*.log {
    daily
    rotate 14
    compress
    delaycompress
    missingok
    notifempty
    create 0640 @APP_USER@ @APP_USER@
}
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    nginx-acme-challenge.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
    # HTTPS (HTTPS=1): the ACME HTTP-01 challenge, answered from a folder only root writes
    # (certbot's webroot), never redirected and never passed to the app.
    location ^~ /.well-known/acme-challenge/ {
        root @ACME_WEBROOT@;
        default_type text/plain;
        try_files $uri =404;
    }
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    nginx-hsts.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
    # HSTS=1: browsers keep to HTTPS for this name for a year (they ignore it over plain HTTP).
    add_header Strict-Transport-Security "max-age=31536000" always;
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    nginx-https.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
    # HTTPS (HTTPS=1, a certificate obtained): port 443 with a modern TLS configuration
    # (Mozilla's "intermediate": TLS 1.2 and 1.3, forward-secret AEAD ciphers only).
    listen 443 ssl default_server;
    listen [::]:443 ssl default_server;
    ssl_certificate @CERT_DIR@/fullchain.pem;
    ssl_certificate_key @CERT_DIR@/privkey.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305;
    ssl_prefer_server_ciphers off;
    ssl_session_cache shared:flask_deploy_tls:10m;
    ssl_session_timeout 1d;
    ssl_session_tickets off;
    # Plain HTTP moves to HTTPS, except the ACME challenge (renewals use it) and loopback
    # names: the guide's `curl http://localhost/` and the health checks on the server itself.
    set $to_https $scheme;
    if ($host ~ ^(localhost|127\.0\.0\.1|\[::1\])$) {
        set $to_https local;
    }
    if ($request_uri ~ ^/\.well-known/acme-challenge/) {
        set $to_https acme;
    }
    if ($to_https = http) {
        return 301 https://$host$request_uri;
    }
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    nginx-maintenance.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/nginx/snippets/@SITE_NAME@-maintenance.conf, included
# in every server block of the site. Maintenance mode (`doit maintenance on|off`): while the
# flag file exists, nginx answers 503 with Retry-After and the live release's maintenance.html
# (a plain page if it has none); requests from the server itself (its health checks, your curl
# on it) still reach the app. Only the workers (www-data) look for the flag and read the page,
# at request time: root's master never reads a file the deploy user or the app can write.
set $maintenance "";
if (-f @DEPLOY_PATH@/shared/maintenance.on) {
    set $maintenance "on";
}
if ($remote_addr = 127.0.0.1) {
    set $maintenance "";
}
if ($remote_addr = ::1) {
    set $maintenance "";
}
# Certificate renewals (HTTP-01 challenges) go on during maintenance.
if ($uri ~ ^/\.well-known/acme-challenge/) {
    set $maintenance "";
}
if ($maintenance) {
    return 503;
}
error_page 503 @maintenance;
location @maintenance {
    root @DEPLOY_PATH@/current;
    add_header Retry-After 60 always;
    add_header Cache-Control no-store always;
    try_files /maintenance.html @maintenance_default;
}
location @maintenance_default {
    default_type text/html;
    add_header Retry-After 60 always;
    add_header Cache-Control no-store always;
    return 503 "<!doctype html><title>Maintenance</title><h1>Down for maintenance</h1><p>We will be back in a minute.</p>\n";
}
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    nginx-site.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/nginx/sites-available/@SITE_NAME@
server {
    listen 80 default_server;
    listen [::]:80 default_server;
    server_name @SERVER_NAME@;
@HTTPS@

    access_log /var/log/nginx/@SITE_NAME@_access.log;
    error_log /var/log/nginx/@SITE_NAME@_error.log;
    client_max_body_size 10m;
    include /etc/nginx/snippets/@SITE_NAME@-maintenance.conf;

    location / {
        proxy_pass http://127.0.0.1:@APP_PORT@;
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_connect_timeout 5s;
        proxy_read_timeout 60s;
    }
}
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    sshd-hardening.conf)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/ssh/sshd_config.d/10-flask-deploy-hardening.conf once
# the deploy key was proven to work. sshd takes the first value it reads, and 10- comes first.
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin @PERMIT_ROOT_LOGIN@
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    sudoers)
      cat <<'END_OF_FLASK_DEPLOY_TEMPLATE'
# Installed by server_setup.sh as /etc/sudoers.d/@SUDOERS_NAME@
# Exactly what the deploy user runs with sudo: the app's units, nginx's check and reload, and
# the guide's log commands. No wildcards: each line is a whole command. None of them reads or
# writes a path deploy or www-data can swap: the log folders belong to root, the units' paths
# are fixed, and systemctl and journalctl page through `less` in its secure mode under sudo
# (no shell, no other files).
Cmnd_Alias APP_UNITS = \
    /usr/bin/systemctl start @SERVICE_NAME@, /usr/bin/systemctl stop @SERVICE_NAME@, \
    /usr/bin/systemctl restart @SERVICE_NAME@, /usr/bin/systemctl reload @SERVICE_NAME@, \
    /usr/bin/systemctl status @SERVICE_NAME@, /usr/bin/systemctl reset-failed @SERVICE_NAME@, \
    /usr/bin/systemctl kill --kill-whom=main --signal=SIGURG @SERVICE_NAME@, \
    /usr/bin/systemctl start @SERVICE_NAME@-migrate, \
    /usr/bin/systemctl start @SERVICE_NAME@-preflight, \
    /usr/bin/systemctl stop @SERVICE_NAME@-preflight
Cmnd_Alias APP_JOURNAL = \
    /usr/bin/journalctl -u @SERVICE_NAME@, /usr/bin/journalctl -u @SERVICE_NAME@ -f, \
    /usr/bin/journalctl -u @SERVICE_NAME@ --no-pager -n 20, \
    /usr/bin/journalctl -u @SERVICE_NAME@ --no-pager -n 50, \
    /usr/bin/journalctl -u @SERVICE_NAME@ --no-pager -n 100, \
    /usr/bin/journalctl -u @SERVICE_NAME@-migrate --no-pager -n 30, \
    /usr/bin/journalctl -u @SERVICE_NAME@-preflight --no-pager -n 30
Cmnd_Alias APP_LOGS = \
    /usr/bin/tail -f @LOG_PATH@/app.log, /usr/bin/tail -f @LOG_PATH@/error.log, \
    /usr/bin/tail -f /var/log/nginx/@SITE_NAME@_access.log, \
    /usr/bin/tail -f /var/log/nginx/@SITE_NAME@_error.log, \
    /usr/bin/tail -n 100 @LOG_PATH@/app.log, /usr/bin/tail -n 100 @LOG_PATH@/error.log, \
    /usr/bin/tail -n 100 /var/log/nginx/@SITE_NAME@_access.log, \
    /usr/bin/tail -n 100 /var/log/nginx/@SITE_NAME@_error.log
Cmnd_Alias APP_NGINX = \
    /usr/sbin/nginx -t, /usr/bin/systemctl reload nginx, /usr/bin/systemctl status nginx
# `doit run` and the deploy hooks: any arguments, since they are the command, which the runner
# (root's own file) starts as @APP_USER@ only inside the service's sandbox (conf/app-run.py).
Cmnd_Alias APP_RUN = /usr/local/sbin/@SERVICE_NAME@-run

@DEPLOY_USER@ ALL=(root) NOPASSWD: APP_UNITS, APP_JOURNAL, APP_LOGS, APP_NGINX, APP_RUN
# No rule runs anything as @APP_USER@ outside the app's sandbox: every program there (the venv's
# python) is one the deploy user can rewrite, and a sha256 bound to it is checked before the
# exec, so it can change in between; APP_RUN starts its command in the sandbox only. The guide's `@DEPLOY_PATH@/venv/bin/python --version` runs as the deploy user.
END_OF_FLASK_DEPLOY_TEMPLATE
      ;;
    *) return 1 ;;
  esac
}
# <<< embedded templates

# -- provisioning state ------------------------------------------------------------------------
# The stamp says which script and templates provisioned this server, with which settings (no
# secrets, no key): `doit check` and `doit deploy` read it as the deploy user and compare it
# with their own copy. Root writes it in /etc/SERVICE_NAME/, a folder only root can write.
stamp_path() {
  echo "/etc/${SERVICE_NAME}/server-setup.stamp"
}

stamp_text() {
  local name
  echo "# written by server_setup.sh after a successful run; read by doit check and deploy"
  echo "script=$(script_digest)"
  echo "templates=$(templates_digest)"
  echo "ssh_hardening=${SSH_HARDENING}"
  for name in DEPLOY_USER APP_USER DEPLOY_PATH BACKUP_PATH LOG_PATH SERVICE_NAME APP_PORT \
    PREFLIGHT_PORT SSH_PORT SERVER_NAME SITE_NAME WORKERS KEEP_PREVIOUS_S BACKUP_SCHEDULE \
    BACKUPS_KEEP BACKUPS_KEEP_DAYS; do
    echo "${name}=${!name}"
  done
}

ensure_stamp() {
  local staged
  staged="$(mktemp)"
  stamp_text > "${staged}"
  ensure_file "$(stamp_path)" 644 root root "${staged}"
  rm -f "${staged}"
}

main() {
  set -euo pipefail
  parse_args "$@"
  # Past its flags (--deploy-key-file /dev/stdin) the script reads no input. A password meant for
  # `sudo -S` that sudo did not need (NOPASSWD) would wait unread on stdin, which every child
  # inherits, those run as deploy too (as_user): the deploy user could attach to one (same uid)
  # and read it. No step gets stdin (R22).
  exec </dev/null
  validate_settings
  ensure_privileges
  find_ssh_ports
  local started="${SECONDS}"
  echo "setup: ${MODE} ${SERVICE_NAME} in ${DEPLOY_PATH} (deploy user ${DEPLOY_USER}," \
    "app user ${APP_USER})"
  ensure_packages "${PACKAGES[@]}"
  ensure_upgraded
  ensure_deploy_user
  ensure_deploy_key
  ensure_sudoers
  ensure_directories
  ensure_app_units
  ensure_https_tools
  ensure_app_runner
  ensure_nginx_site
  ensure_certificate
  ensure_logrotate
  ensure_fail2ban
  ensure_firewall
  ensure_service_active ssh
  ensure_ssh_hardening
  ensure_stamp
  echo "setup: ${CHANGES} changed, ${UNCHANGED} ok in $((SECONDS - started)) s"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
