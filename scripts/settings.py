"""Settings: `.env` (python-dotenv), overridden by real environment variables, over what the app
declares in its pyproject.toml (scripts/app_declared.py), over the defaults; validated into one
typed, frozen object. Every problem becomes one line naming the setting and what to do."""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from dotenv import dotenv_values

from scripts.app_declared import PYPROJECT, TABLE, declared_settings
from scripts.errors import SettingsError

REPO_ROOT = Path(__file__).resolve().parent.parent

# DEPLOY_SERVER left unset (or set to this word) targets the local sandbox server.
SANDBOX_TARGET = "sandbox"

_SAFE_REMOTE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
# The same pattern as server_setup.sh's SERVICE_NAME_PATTERN (a unit test holds them equal): the
# name makes /etc/<name>/, a sudoers file and unit names, so no '/' and no leading '.' or '-'.
SERVICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"
# Release and backup names as the server lists them: never ".", ".." or a path.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# A DNS name, or a `Host` alias of an SSH configuration, which may hold '_' (web_1); never a
# leading '-' (ssh would read an option).
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$")
_IPV6 = re.compile(r"^\[?[0-9A-Fa-f:.]+\]?$")
_PYTHON_VERSION = re.compile(r"^3\.\d{1,2}$")
_PLATFORM_TAG = re.compile(r"^[a-z0-9_]+$")


class _Invalid(ValueError):
    """Raised by a parser; the loader prefixes the setting's name and value."""


def _matching(pattern: str, message: str, optional: bool = False):
    """A parser that accepts what matches the whole pattern (and, if optional, nothing)."""
    def parse(raw: str) -> str:
        if optional and not raw.strip():
            return ""
        if not re.fullmatch(pattern, raw):
            raise _Invalid(message)
        return raw
    return parse


_server_name = _matching(r"[A-Za-z0-9_.* -]{1,250}",
                         "must be domain names separated by spaces, or _ for any")
_any_url = _matching(r"https?://\S+", "must be an http:// or https:// URL")
_optional_any_url = _matching(r"https?://\S+", "must be an http:// or https:// URL",
                              optional=True)
_optional_token = _matching(r"[0-9]+:[A-Za-z0-9_-]+",
                            "must look like 123456:ABC-DEF... (from @BotFather)", optional=True)
_optional_chat_id = _matching(r"-?[0-9]+|@[A-Za-z0-9_]{5,}",
                              "must be a numeric chat id or @channelname", optional=True)
_optional_http_url = _matching(r"http://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9._~/-]*)?",
                               "must be a plain http:// URL of a Debian mirror", optional=True)
_sandbox_suite = _matching(r"bookworm|trixie", "must be bookworm (Debian 12) or trixie (Debian 13)")
_url_path = _matching(r"/[A-Za-z0-9._~/-]*", "must be a URL path such as /healthz")
_release_id = _matching(_NAME, "must be a release id as `doit status` lists them",
                        optional=True)
_backup_name = _matching(_NAME, "must be a backup name as `doit backups` lists them",
                         optional=True)


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
_optional_email = _matching(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
                            "must be an email address", optional=True)
# The same pattern as server_setup.sh's check of ACME_SERVER.
_acme_url = _matching(r"https://[A-Za-z0-9.:_-]+(/[A-Za-z0-9._~/-]*)?",
                      "must be the https:// URL of an ACME directory")


def _https_problems(values: Mapping[str, object]) -> list[str]:
    """HTTPS=1 needs a domain and an email; a CA bundle only for a custom ACME server."""
    problems = []
    if values.get("https"):
        name = str(values.get("server_name", "_"))
        if name == "_" or "*" in name:
            problems.append("setting HTTPS=1 needs SERVER_NAME set to your domain (not _ and no "
                            "wildcards): the certificate names it; set it in .env or the "
                            "environment")
        if not values.get("letsencrypt_email"):
            problems.append("setting HTTPS=1 needs LETSENCRYPT_EMAIL, the ACME account's email "
                            "address (for expiry notices); set it in .env or the environment")
    bundle = values.get("acme_ca_bundle")
    if bundle and values.get("acme_server") == LETS_ENCRYPT:
        problems.append("setting ACME_CA_BUNDLE is only for a custom ACME_SERVER: Let's Encrypt "
                        "is trusted already; remove it")
    elif bundle and not Path(str(bundle)).is_file():
        problems.append(f"setting ACME_CA_BUNDLE={str(bundle)!r}: no such file")
    return problems


def _text(raw: str) -> str:
    if not raw.strip():
        raise _Invalid("is empty")
    return raw.strip()


def _servers(raw: str) -> tuple[str, ...]:
    hosts = tuple(part.strip() for part in raw.split(","))
    if not raw.strip() or any(not host for host in hosts):
        raise _Invalid(f"is empty; set it to your server's address, or leave it unset to use the "
                       f"local sandbox ({SANDBOX_TARGET})")
    if hosts == (SANDBOX_TARGET,):
        return ()
    for host in hosts:
        scheme = re.match(r"([a-z][a-z0-9+.-]*)://([^/]*)", host, re.I)
        if scheme:  # a pasted URL: say what to write instead, not that its "port" is bad
            raise _Invalid(f"has {host!r}, a URL; write the SSH address alone, as in "
                           f"{scheme.group(2) or 'your-server.com'} or deploy@host:2222")
        user, name, port = split_host(host)
        if user is not None and not _USER_NAME.match(user):
            raise _Invalid(f"has {host!r}, whose user is not a Linux user name")
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise _Invalid(f"has {host!r}, whose port is not a number from 1 to 65535")
        if not (_HOST_NAME.match(name) or (":" in name and _IPV6.match(name))):
            raise _Invalid(f"has {host!r}, which is not a host name or IP address")
    return hosts


def split_host(entry: str) -> tuple[str | None, str, str | None]:
    """`[user@]host[:port]` (IPv6 as [addr]:port) -> (user, host, port)."""
    user, _, rest = entry.rpartition("@")
    port = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else None
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host = rest
    return (user or None), host, port


def _user(raw: str) -> str:
    if not _USER_NAME.match(raw):
        raise _Invalid("must be a Linux user name: lowercase letters, digits, '_' or '-'")
    return raw


def _remote_path(raw: str) -> PurePosixPath:
    if not raw.startswith("/"):
        raise _Invalid("must be an absolute path such as /var/www/flask_helpdesk")
    if raw.rstrip("/") == "":
        raise _Invalid("must not be the root directory /")
    if not _SAFE_REMOTE_PATH.match(raw):
        raise _Invalid("may hold only letters, digits, '.', '_', '-' and '/' (no spaces, quotes, "
                       "';' or '$')")
    if ".." in PurePosixPath(raw).parts:
        raise _Invalid("must not contain '..'")
    return PurePosixPath(raw)


def _sudo_password(raw: str) -> str:
    if "\n" in raw or "\r" in raw:
        raise _Invalid("must be one line (sudo -S reads one line)")
    return raw


def _optional_user(raw: str) -> str:
    return _user(raw) if raw.strip() else ""


def _command(raw: str) -> str:
    if raw.strip() and not re.fullmatch(r"[A-Za-z0-9_ ./:=-]{1,250}", raw):
        raise _Invalid("may hold only letters, digits, spaces and _ . / : = -")
    return raw.strip()


def _app_paths(raw: str) -> tuple[str, ...]:
    paths = tuple(part.strip().strip("/") for part in raw.split(",") if part.strip())
    for item in paths:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", item) or \
                ".." in item.split("/"):
            raise _Invalid(f"{item!r} must be a path inside the app, such as migrations or "
                           f"helpdesk/db.py (comma-separated)")
    return paths


def _optional_url(raw: str) -> str:
    if raw and not re.fullmatch(r"https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?", raw):
        raise _Invalid("must be a URL such as https://helpdesk.example.com/")
    return raw if not raw or raw.endswith("/") else raw + "/"


def _language(raw: str) -> str:
    if raw not in ("ru", "en"):
        raise _Invalid("must be ru or en")
    return raw


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid("must be a number of seconds") from None
    if not 0 < value <= 60:
        raise _Invalid("must be between 0 and 60 seconds")
    return value


def _wait_seconds(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 600:
        raise _Invalid("must be a whole number of seconds from 1 to 600")
    return int(raw)


def _batch(raw: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*%?", raw) or (raw.endswith("%") and int(raw[:-1]) > 100):
        raise _Invalid("must be a number of servers (2) or a share of them (25%)")
    return raw


def _unit_name(raw: str) -> str:
    name = raw.removesuffix(".service")
    if not re.match(SERVICE_NAME_PATTERN, name):
        raise _Invalid("is not a valid service name (a letter or digit, then letters, digits, "
                       "':', '_', '.', '-'; at most 100)")
    return name


def _port(raw: str) -> int:
    if not raw.isdigit():
        raise _Invalid("must be a port number from 1 to 65535")
    port = int(raw)
    if not 1 <= port <= 65535:
        raise _Invalid("must be a port number from 1 to 65535")
    return port


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise _Invalid("must be a whole number of 1 or more")
    return int(raw)


def _kept_seconds(raw: str) -> int:
    if not raw.isdigit() or int(raw) > 86400:
        raise _Invalid("must be a whole number of seconds from 0 to 86400 (0: not kept)")
    return int(raw)


def _days(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid("must be a number of days, such as 7 (0: age keeps nothing)") from None
    if not 0 <= value <= 36500:
        raise _Invalid("must be a number of days from 0 up")
    return value


def _megabytes(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid("must be a number of megabytes, such as 20") from None
    if value <= 0:
        raise _Invalid("must be more than 0")
    return value


def _local_path(raw: str) -> Path:
    path = Path(_text(raw)).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _optional_local_path(raw: str) -> Path | None:
    return _local_path(raw) if raw.strip() else None


def _optional_existing_file(raw: str) -> Path | None:
    path = _optional_local_path(raw)
    if path is not None and not path.is_file():
        raise _Invalid("is not a file here; point it at one, or leave it unset")
    return path


def _python_version(raw: str) -> str:
    if raw and not _PYTHON_VERSION.match(raw):
        raise _Invalid("must be a Python version such as 3.11")
    return raw


def _platform_tag(raw: str) -> str:
    if raw and not _PLATFORM_TAG.match(raw):
        raise _Invalid("must be a wheel platform tag such as manylinux_2_36_x86_64")
    return raw


def _flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise _Invalid("must be 1 or 0")


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], object]
    default: str | Callable[[], str] | None
    help: str
    secret: bool = False
    attr: str = ""  # the Settings field, when it is not the lowercase name

    @property
    def field_name(self) -> str:
        return self.attr or self.name.lower()


# The table every loader, document and test reads. Defaults are the user's guide's values.
SETTINGS: tuple[Setting, ...] = (
    Setting("DEPLOY_SERVER", _servers, SANDBOX_TARGET,
            "server address(es), comma-separated; unset or 'sandbox' means the local sandbox",
            attr="deploy_servers"),
    Setting("DEPLOY_HOSTS_FILE", _optional_local_path, "",
            "a file of servers, one `[user@]host[:port]` a line (instead of DEPLOY_SERVER)"),
    Setting("DEPLOY_USER", _user, "deploy", "SSH user that deploys and owns the releases"),
    Setting("DEPLOY_PATH", _remote_path, "/var/www/flask_helpdesk", "where releases live"),
    Setting("BACKUP_PATH", _remote_path, "/var/backups/flask_helpdesk", "database backups"),
    Setting("SERVICE_NAME", _unit_name, "flask-helpdesk", "systemd service of the app"),
    Setting("APP_PORT", _port, "5000", "port gunicorn listens on, on 127.0.0.1 only"),
    Setting("SSH_PORT", _port, "22", "SSH port of the server(s)"),
    Setting("SSH_KEY_FILE", _optional_local_path, "", "private key for SSH (else ssh-agent)"),
    Setting("SSH_KNOWN_HOSTS_FILE", _optional_local_path, "",
            "known_hosts file that holds the servers' host keys (else ~/.ssh/known_hosts)"),
    Setting("SSH_CONFIG", _optional_local_path, "",
            "OpenSSH config file whose `Host` entries DEPLOY_SERVER may name (else ssh's own: "
            "~/.ssh/config and /etc/ssh/ssh_config)"),
    Setting("SETUP_USER", _optional_user, "",
            "account with sudo that provisions (default: root; admin on sandbox servers)"),
    Setting("SETUP_KEY_FILE", _optional_local_path, "",
            "SETUP_USER's own private key (else ssh-agent); never the deploy key"),
    Setting("SETUP_SUDO_PASSWORD", _sudo_password, "",
            "SETUP_USER's sudo password, fed to `sudo -S` (unset: sudo must need none)",
            secret=True),
    Setting("DEPLOY_PUBLIC_KEY_FILE", _optional_local_path, "",
            "public key installed for DEPLOY_USER by `doit setup` (default: SSH_KEY_FILE.pub)"),
    Setting("SERVER_NAME", _server_name, "_", "nginx server_name: your domain (_ = any)"),
    Setting("HTTPS", _flag, "0",
            "1: a Let's Encrypt certificate for SERVER_NAME, port 443, HTTP redirected to HTTPS "
            "(needs SERVER_NAME and LETSENCRYPT_EMAIL)"),
    Setting("LETSENCRYPT_EMAIL", _optional_email, "",
            "the ACME account's email address (expiry notices); needed with HTTPS=1"),
    Setting("ACME_SERVER", _acme_url, LETS_ENCRYPT,
            "ACME directory URL the certificate comes from (default: Let's Encrypt)"),
    Setting("ACME_CA_BUNDLE", _optional_local_path, "",
            "CA file (PEM) of a custom ACME_SERVER's TLS certificate, installed on the server "
            "for certbot (empty: the system's CAs)"),
    Setting("HSTS", _flag, "0",
            "1: HTTPS answers carry Strict-Transport-Security (browsers then refuse plain HTTP "
            "for a year)"),
    Setting("MIGRATE_COMMAND", _command, "flask --app wsgi migrate",
            "migrations, run in the release with its venv on PATH (empty: none)"),
    Setting("MIGRATIONS_PATHS", _app_paths, "",
            "app files/folders that hold migrations; when set and unchanged since the live "
            "release (MIGRATE_COMMAND too), the migrate step is skipped (empty: always migrate; "
            "the app's pyproject.toml may declare them)"),
    Setting("GUNICORN_WORKERS", _positive_int, "2", "gunicorn worker processes"),
    Setting("KEEP_PREVIOUS_S", _kept_seconds, "900",
            "seconds a deploy keeps the previous release loaded (parked, no workers), so a "
            "rollback to it wakes it instead of booting (0: not kept; applied by setup)"),
    Setting("PUBLIC_URL", _optional_url, "",
            "where people open the app (default http://<server>/); verify checks it from here"),
    Setting("HEALTH_PATH", _url_path, "/healthz",
            "health URL path; a JSON answer with `release` is checked against the release id"),
    Setting("HEALTH_TIMEOUT_S", _wait_seconds, "30",
            "longest wait for a new release to answer healthy (an error answer fails at once)"),
    Setting("APP_ENV_FILE", _optional_existing_file, "",
            "local file uploaded as the app's environment, /etc/<SERVICE_NAME>/app.env (0600); "
            "unset: keep the server's"),
    Setting("DEPLOY_PARALLEL", _positive_int, "4", "servers prepared (upload, venv) at once"),
    Setting("DEPLOY_BATCH", _batch, "1",
            "servers switched at once in a rolling deploy: a count, or a share such as 25%"),
    Setting("KEEP_RELEASES", _positive_int, "5", "good releases kept on the server"),
    Setting("BACKUPS_KEEP", _positive_int, "10",
            "newest database backups kept in BACKUP_PATH (also kept: the last backup before "
            "each schema change, and one of the schema each kept release served)"),
    Setting("BACKUPS_KEEP_DAYS", _days, "7", "backups younger than this many days are kept"),
    Setting("BACKUP_SCHEDULE", _matching(r"[A-Za-z0-9 :*/,.~-]{1,100}", "must be a systemd "
                                         "OnCalendar value such as daily or *-*-* 03:00"),
            "daily", "when the server's backup timer backs the database up (systemd OnCalendar)"),
    Setting("MIN_FREE_MB", _positive_int, "200", "free disk `check` requires beyond the release"),
    Setting("AUTO_ROLLBACK", _flag, "1", "verify rolls back by itself when it fails (and a "
            "deploy whose post-switch hook fails)"),
    Setting("MAINTENANCE_DURING_MIGRATIONS", _flag, "0",
            "maintenance mode (503 with the app's maintenance.html) while a deploy's changed "
            "migrations run"),
    Setting("FORCE_RELEASE", _flag, "0",
            "ship a release even though it failed verification before"),
    Setting("RELEASE", _release_id, "", "rollback target (default: the previous good release)"),
    Setting("RESTORE_BACKUP", _backup_name, "",
            "the backup `doit restore` restores (a name from `doit backups`); rollback ignores it"),
    Setting("BACKUP", _backup_name, "",
            "the backup `doit backup-pull` copies here (default: the newest)"),
    Setting("BACKUP_PULL_DIR", _local_path, "backups",
            "where `doit backup-pull` puts copies: <dir>/<server>/<backup>/"),
    Setting("NOTIFY_WEBHOOK_URL", _optional_any_url, "",
            "JSON webhook (Slack/Mattermost `text`) told of deploys and rollbacks", secret=True),
    Setting("TELEGRAM_BOT_TOKEN", _optional_token, "", "Telegram bot token for notifications",
            secret=True),
    Setting("TELEGRAM_CHAT_ID", _optional_chat_id, "", "Telegram chat that gets them"),
    Setting("TELEGRAM_API_URL", _any_url, "https://api.telegram.org", "Telegram Bot API base"),
    Setting("NOTIFY_LANGUAGE", _language, "ru", "language of notifications: ru or en"),
    Setting("NOTIFY_TIMEOUT_S", _seconds, "3", "longest a notification may take"),
    Setting("HISTORY_COUNT", _positive_int, "20", "entries `doit history` shows"),
    Setting("APP_DIR", _local_path, "examples/helpdesk", "the Flask app to package"),
    Setting("DIST_DIR", _local_path, "dist", "where packages are written"),
    Setting("PACKAGE_MAX_MB", _megabytes, "20", "largest package allowed, in MB"),
    Setting("TARGET_PYTHON", _python_version, "",
            "the servers' Python, such as 3.13 (default: what the servers report, else 3.11)"),
    Setting("TARGET_PLATFORM", _platform_tag, "",
            "the servers' wheel platform (default: what the servers report, else "
            "manylinux_2_36 of this machine's architecture)"),
    Setting("WHEEL_CACHE", _local_path, "~/.cache/flask-deploy/wheels",
            "local cache of downloaded wheels"),
    Setting("SANDBOX_DIR", _local_path, ".sandbox", "state of the local sandbox servers"),
    Setting("SANDBOX_CACHE", _local_path, "/var/cache/flask-deploy",
            "cached Debian image and .deb files for sandbox servers"),
    Setting("SANDBOX_SERVERS", _positive_int, "1", "how many sandbox servers `doit sandbox` boots"),
    Setting("SANDBOX_MIRROR", _optional_http_url, "",
            "http:// Debian mirror for sandbox servers (default: this machine's apt sources)"),
    Setting("SANDBOX_SUITE", _sandbox_suite, "bookworm",
            "Debian release of sandbox servers: bookworm (12) or trixie (13)"),
    Setting("DRY_RUN", _flag, "0", "print steps and commands without running them"),
)


@dataclass(frozen=True)
class Settings:
    deploy_servers: tuple[str, ...]
    deploy_hosts_file: Path | None
    deploy_user: str
    deploy_path: PurePosixPath
    backup_path: PurePosixPath
    service_name: str
    app_port: int
    ssh_port: int
    ssh_key_file: Path | None
    ssh_known_hosts_file: Path | None
    ssh_config: Path | None
    setup_user: str
    setup_key_file: Path | None
    setup_sudo_password: str = field(repr=False)  # a secret: never in a printed Settings
    deploy_public_key_file: Path | None
    server_name: str
    https: bool
    letsencrypt_email: str
    acme_server: str
    acme_ca_bundle: Path | None
    hsts: bool
    migrate_command: str
    migrations_paths: tuple[str, ...]
    gunicorn_workers: int
    keep_previous_s: int
    public_url: str
    health_path: str
    health_timeout_s: int
    app_env_file: Path | None
    deploy_parallel: int
    deploy_batch: str
    keep_releases: int
    backups_keep: int
    backups_keep_days: float
    backup_schedule: str
    min_free_mb: int
    auto_rollback: bool
    maintenance_during_migrations: bool
    force_release: bool
    release: str
    restore_backup: str
    backup: str
    backup_pull_dir: Path
    notify_webhook_url: str
    telegram_bot_token: str
    telegram_chat_id: str
    telegram_api_url: str
    notify_language: str
    notify_timeout_s: float
    history_count: int
    app_dir: Path
    dist_dir: Path
    package_max_mb: float
    target_python: str
    target_platform: str
    wheel_cache: Path
    sandbox_dir: Path
    sandbox_cache: Path
    sandbox_servers: int
    sandbox_mirror: str
    sandbox_suite: str
    dry_run: bool
    # Settings the user gave (in .env or the environment), not defaults: a default DEPLOY_USER or
    # SSH_PORT gives way to what the SSH configuration names for a host, a given one does not.
    given: frozenset[str] = frozenset()

    @property
    def uses_sandbox(self) -> bool:
        return not self.deploy_servers


def read_raw(env_file: Path | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The raw values: `.env` first, then the real environment wins (as CI variables must)."""
    environ = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    env_file = _env_file(env_file, environ)
    if env_file.is_file():
        # A line it cannot parse is a problem of load_settings (_unreadable_lines), not a log line.
        logging.getLogger("dotenv.main").setLevel(logging.ERROR)
        raw.update({key: value or "" for key, value in dotenv_values(env_file).items()})
    raw.update({s.name: environ[s.name] for s in SETTINGS if s.name in environ})
    return raw


def _env_file(env_file: Path | None, environ: Mapping[str, str]) -> Path:
    # ENV_FILE points elsewhere (tests use it to ignore a user's .env)
    return env_file or Path(environ.get("ENV_FILE") or REPO_ROOT / ".env")


def _unreadable_lines(env_file: Path) -> list[str]:
    """One problem per `.env` statement python-dotenv cannot parse (`DEPLOY_SERVER 10.0.0.5`, an
    unclosed quote): it would skip it and the task would run without that setting, a lost
    DEPLOY_SERVER line meaning the local sandbox. Only the line's number and name are shown: the
    value may be a secret."""
    from dotenv.parser import parse_stream

    if not env_file.is_file():
        return []
    with env_file.open(encoding="utf-8") as stream:
        bad = [binding.original for binding in parse_stream(stream) if binding.error]
    problems = []
    for original in bad:
        name = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)", original.string)
        which = f" ({name.group(1)})" if name else ""
        problems.append(f"{env_file} line {original.line}{which} is not NAME=value, so it would "
                        f"be ignored; write it as NAME=value (quotes closed) or remove it")
    return problems


# Names the toolkit reads besides SETTINGS: the GitLab job's SSH variables (scripts/ci-ssh.sh)
# and the ENV_FILE switch. They are never taken for a misspelt setting.
OTHER_NAMES = frozenset({"SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS", "SSH_AUTH_SOCK", "ENV_FILE"})


@functools.lru_cache(maxsize=None)  # asked for every environment variable on every load
def meant_setting(name: str) -> str | None:
    """The setting a misspelt name most likely meant (DEPLOY_SEVRER -> DEPLOY_SERVER), if any:
    close in spelling and starting with the same word, so PATH or CI_SERVER never match."""
    import difflib

    if name in OTHER_NAMES or any(s.name == name for s in SETTINGS):
        return None
    if any(s.name == name.upper() for s in SETTINGS):  # deploy_server: names are upper case
        return name.upper()
    same_word = [s.name for s in SETTINGS if s.name.split("_")[0] == name.split("_")[0]]
    close = difflib.get_close_matches(name, same_word, n=1, cutoff=0.8)
    return close[0] if close else None


_warned: set[str] = set()


def _unknown_names(raw: Mapping[str, str], environ: Mapping[str, str],
                   env_file: Path) -> list[str]:
    """Problems for names that look like a misspelt setting (in .env or the environment); a
    warning, once, for any other name in .env, which the toolkit ignores."""
    import sys

    problems = []
    known = {s.name for s in SETTINGS}
    for name in sorted(set(raw) | set(environ)):
        meant = meant_setting(name)
        where = ".env" if name in raw and name not in known else "the environment"
        if meant:
            # Also when MEANT is set too: `KEEP_RELEASE=3 doit deploy` beside KEEP_RELEASES in
            # .env must not quietly deploy with the .env value.
            also = (f" ({meant} is set too, so {name} would be ignored)"
                    if meant in raw or meant in environ else "")
            problems.append(f"setting {name} (in {where}) is unknown; did you mean {meant}?"
                            f"{also} rename or remove it there")
        elif name in raw and name not in known and name not in _warned and not meant:
            _warned.add(name)
            print(f"warning: {env_file}: {name} is not a toolkit setting and is ignored (the "
                  f"app's own settings belong in APP_ENV_FILE)", file=sys.stderr)
    return problems


def _app_declarations(raw: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """{SETTING: text} APP_DIR's pyproject.toml declares (below .env and the environment, above
    the defaults), each parsed as the setting is; a bad one is a problem even while .env
    overrides it (the app's file is fixed there). Nothing while APP_DIR itself is bad (that
    problem is reported as its own)."""
    app_dir = next(s for s in SETTINGS if s.name == "APP_DIR")
    try:
        folder = _local_path(raw.get("APP_DIR", str(app_dir.default)))
    except _Invalid:
        return {}, []
    found, problems = declared_settings(folder)
    declared = {}
    for setting in SETTINGS:
        if setting.name not in found:
            continue
        key, text = found[setting.name]
        try:
            setting.parse(text)
            declared[setting.name] = text
        except _Invalid as invalid:
            problems.append(f"{folder / PYPROJECT}: {TABLE} {key} = {text!r} {invalid}; fix it "
                            f"there, or override it with {setting.name} in .env or the "
                            f"environment")
    return declared, problems


def load_settings(env_file: Path | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Validated settings, or a SettingsError listing one line per bad setting."""
    environ = os.environ if environ is None else environ
    raw = read_raw(env_file, environ)
    values: dict[str, object] = {}
    problems = (_unreadable_lines(_env_file(env_file, environ))
                + _unknown_names(raw, environ, _env_file(env_file, environ)))
    declared, declared_problems = _app_declarations(raw)
    problems += declared_problems
    for setting in SETTINGS:
        if setting.name in raw:
            text = raw[setting.name]
        elif setting.name in declared:
            text = declared[setting.name]
        else:
            text = setting.default() if callable(setting.default) else setting.default
        try:
            values[setting.field_name] = setting.parse(text)
        except _Invalid as invalid:
            shown = "***" if setting.secret else repr(text)
            problems.append(f"setting {setting.name}={shown} {invalid}; fix it in .env or the "
                            f"environment")
    if not problems:
        problems += _https_problems(values)
    hosts_file = values.get("deploy_hosts_file")
    if hosts_file and not problems:
        try:
            lines = [line.split("#")[0].strip() for line in Path(hosts_file).read_text()
                     .splitlines()]
            values["deploy_servers"] = _servers(",".join(line for line in lines if line))
        except OSError:
            problems.append(f"setting DEPLOY_HOSTS_FILE={str(hosts_file)!r}: cannot read it")
        except _Invalid as invalid:
            problems.append(f"setting DEPLOY_HOSTS_FILE={str(hosts_file)!r}: it {invalid}")
    if "DEPLOY_SERVER" not in raw and not hosts_file and environ.get("GITLAB_CI") == "true":
        # A pipeline never falls back to a local sandbox: it must name its server.
        problems.insert(0, "setting DEPLOY_SERVER is not set; add it as a GitLab CI/CD variable "
                           "(Settings -> CI/CD -> Variables)")
    if problems:
        raise SettingsError("\n".join(problems))
    return Settings(**values, given=frozenset(raw) & {s.name for s in SETTINGS})
