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
MIGRATE_COMMAND="${MIGRATE_COMMAND:-flask --app wsgi migrate}"
BACKUP_SCHEDULE="${BACKUP_SCHEDULE:-daily}"
BACKUPS_KEEP="${BACKUPS_KEEP:-10}"
BACKUPS_KEEP_DAYS="${BACKUPS_KEEP_DAYS:-7}"
DEPLOY_PUBLIC_KEY="${DEPLOY_PUBLIC_KEY:-}"
CONF_DIR="${CONF_DIR:-}"
MODE="apply"
UPGRADE=0
ALLOW_ROOT=0
DEPLOY_KEY_VERIFIED=0

readonly PACKAGES=(python3 python3-venv python3-systemd nginx supervisor ufw fail2ban logrotate
  curl htop)
readonly SSH_HARDENING_FILE=/etc/ssh/sshd_config.d/10-flask-deploy-hardening.conf
# The same pattern as scripts/settings.py's SERVICE_NAME (a unit test holds them equal): it
# names /etc/<name>/, a sudoers file and units, so no '/', no leading '.' or '-'.
readonly SERVICE_NAME_PATTERN='^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'

# Filled in by the steps that need them; templates read them through render_values.
SUDOERS_NAME=""
PERMIT_ROOT_LOGIN="no"

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
  --migrate-command CMD   migrations, run in the release (MIGRATE_COMMAND)
  --backup-schedule WHEN  scheduled backups, a systemd OnCalendar value (BACKUP_SCHEDULE, daily)
  --backups-keep N        newest backups kept (BACKUPS_KEEP, default 10)
  --backups-keep-days N   backups younger than N days are kept (BACKUPS_KEEP_DAYS, default 7)
  --deploy-key KEY        the deploy user's SSH public key (DEPLOY_PUBLIC_KEY)
  --deploy-key-file FILE  ... or read it from a file
  --deploy-key-verified   the deploy key was seen to work: SSH hardening may be applied
  --conf-dir DIR          templates (CONF_DIR, default: conf/ beside this script)
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
      --migrate-command) need_value "$@"; MIGRATE_COMMAND="$2"; shift ;;
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
  CONF_DIR="${CONF_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/conf}"
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
  validate_name MIGRATE_COMMAND "${MIGRATE_COMMAND}" '^[A-Za-z0-9_ ./:=-]{1,250}$'
  validate_name WORKERS "${WORKERS}" '^[1-9][0-9]?$'
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
  [[ -d "${CONF_DIR}" ]] || die "templates not found in ${CONF_DIR}; pass --conf-dir"
}

# -- privileges: refuse plain root, re-run with sudo otherwise --------------------------------
current_uid() { id -u; }

settings_as_flags() {
  local flags=(--deploy-user "${DEPLOY_USER}" --app-user "${APP_USER}"
    --deploy-path "${DEPLOY_PATH}" --backup-path "${BACKUP_PATH}" --log-path "${LOG_PATH}"
    --service-name "${SERVICE_NAME}" --app-port "${APP_PORT}"
    --preflight-port "${PREFLIGHT_PORT}" --ssh-port "${SSH_PORT}"
    --server-name "${SERVER_NAME}" --site-name "${SITE_NAME}" --workers "${WORKERS}"
    --migrate-command "${MIGRATE_COMMAND}" --backup-schedule "${BACKUP_SCHEDULE}"
    --backups-keep "${BACKUPS_KEEP}" --backups-keep-days "${BACKUPS_KEEP_DAYS}"
    --conf-dir "${CONF_DIR}")
  [[ -z "${DEPLOY_PUBLIC_KEY}" ]] || flags+=(--deploy-key "${DEPLOY_PUBLIC_KEY}")
  local session
  session="$(session_ssh_port)"
  [[ -z "${session}" ]] || flags+=(--session-ssh-port "${session}")
  [[ "${DEPLOY_KEY_VERIFIED}" -eq 0 ]] || flags+=(--deploy-key-verified)
  [[ "${UPGRADE}" -eq 0 ]] || flags+=(--upgrade)
  [[ "${MODE}" != "check" ]] || flags+=(--check)
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

# -- generic ensure_* helpers -----------------------------------------------------------------
render_template() {
  local template="$1" hardening
  hardening="$(mktemp)"
  render_values "${CONF_DIR}/hardening.conf" > "${hardening}"
  render_values "${CONF_DIR}/${template}" \
    | sed -e "/^@HARDENING@\$/{r ${hardening}" -e 'd;}'
  rm -f "${hardening}"
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
    "MIGRATE_COMMAND=${MIGRATE_COMMAND}" "SUDOERS_NAME=${SUDOERS_NAME}"
    "BACKUP_SCHEDULE=${BACKUP_SCHEDULE}" "BACKUPS_KEEP=${BACKUPS_KEEP}"
    "BACKUPS_KEEP_DAYS=${BACKUPS_KEEP_DAYS}"
    "PERMIT_ROOT_LOGIN=${PERMIT_ROOT_LOGIN}" "OPEN_DATA_TO_GROUP=${open_data}"
    "DATA_PATH=${data}" "SSH_PORTS=${SSH_PORTS:-${SSH_PORT}}")
  for pair in "${pairs[@]}"; do
    name="${pair%%=*}"
    value="${pair#*=}"
    value="${value//\\/\\\\}"
    value="${value//|/\\|}"
    value="${value//&/\\&}"
    escaped+=(-e "s|@${name}@|${value}|g")
  done
  sed "${escaped[@]}" "$1"
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
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" >/dev/null
}

ensure_upgraded() {
  [[ "${UPGRADE}" -eq 1 ]] || return 0
  report_change "apt-get upgrade" || return 0
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q >/dev/null
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

ensure_nginx_site() {
  local available="/etc/nginx/sites-available/${SITE_NAME}"
  local enabled="/etc/nginx/sites-enabled/${SITE_NAME}"
  local changed=0 previous=""
  if [[ -f "${available}" ]]; then
    previous="$(mktemp)"
    cp -p "${available}" "${previous}"
  fi
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

# The deploy key works when the caller says so (doit setup logs in with it first) or when sshd
# logged a key login of the deploy user.
deploy_key_proven() {
  [[ "${DEPLOY_KEY_VERIFIED}" -eq 1 ]] && return 0
  # grep reads all of it: with pipefail, grep -q would make journalctl die of SIGPIPE.
  journalctl -u ssh -u sshd --no-pager -q 2>/dev/null \
    | grep "Accepted publickey for ${DEPLOY_USER} from" >/dev/null
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
    echo "note: SSH hardening waits until the deploy key has logged in once (ssh" \
      "${DEPLOY_USER}@this-server), then run this again; passwords stay allowed until then"
    return 0
  fi
  PERMIT_ROOT_LOGIN="no"
  if ! admin_login_remains; then
    PERMIT_ROOT_LOGIN="prohibit-password"
    echo "note: root keeps key-only login: no other user with sudo has an SSH key"
  fi
  ensure_template sshd-hardening.conf "${SSH_HARDENING_FILE}" 644 root root
  if [[ "${FILE_CHANGED}" -eq 1 && "${MODE}" == "apply" ]]; then
    if ! sshd -t; then
      rm -f "${SSH_HARDENING_FILE}"
      die "sshd -t fails with the hardening; it was removed again"
    fi
    systemctl reload ssh
  fi
}

main() {
  set -euo pipefail
  parse_args "$@"
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
  ensure_nginx_site
  ensure_logrotate
  ensure_fail2ban
  ensure_firewall
  ensure_service_active ssh
  ensure_ssh_hardening
  echo "setup: ${CHANGES} changed, ${UNCHANGED} ok in $((SECONDS - started)) s"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
