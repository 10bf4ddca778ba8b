"""`doit setup`: upload server_setup.sh (alone, its templates embedded from conf/) to each server
and run it there over SSH as root (SETUP_USER root, or through sudo), prove the deploy key logs
in, then run once more so SSH hardening can apply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.remote import Target, connect
from scripts.settings import Settings

# What server_setup.sh prints while SSH hardening waits for a proven deploy key.
HARDENING_WAITS = "note: SSH hardening waits"


@dataclass(frozen=True)
class SetupOutcome:
    target: Target
    changed: int
    lines: list[str]


def setup_flags(settings: Settings, public_key: str, inside_ssh_port: int) -> list[str]:
    """server_setup.sh's flags for these settings (a pure function: unit-tested)."""
    return ["--deploy-user", settings.deploy_user,
            "--deploy-path", str(settings.deploy_path),
            "--backup-path", str(settings.backup_path),
            "--service-name", settings.service_name,
            "--app-port", str(settings.app_port),
            "--ssh-port", str(inside_ssh_port),
            "--server-name", settings.server_name,
            "--workers", str(settings.gunicorn_workers),
            "--keep-previous-s", str(settings.keep_previous_s),
            "--backup-schedule", settings.backup_schedule,
            "--backups-keep", str(settings.backups_keep),
            "--backups-keep-days", f"{settings.backups_keep_days:g}",
            "--deploy-key", public_key, *https_flags(settings)]


# Where a local ACME_CA_BUNDLE goes in the upload folder; its flag names it there.
CA_BUNDLE_NAME = "acme-ca.pem"


def https_flags(settings: Settings) -> list[str]:
    """server_setup.sh's HTTPS flags. ACME_CA_BUNDLE is a local file: it travels with the
    upload, and its flag's value is the local path until provision() points it there."""
    flags = ["--acme-server", settings.acme_server]
    if settings.https:
        flags.append("--https")
    if settings.letsencrypt_email:
        flags += ["--letsencrypt-email", settings.letsencrypt_email]
    if settings.acme_ca_bundle:
        flags += ["--acme-ca-bundle", str(settings.acme_ca_bundle)]
    if settings.hsts:
        flags.append("--hsts")
    return flags


def _upload_ca_bundle(machine, remote_dir: str, flags: list[str]) -> list[str]:
    """flags with a local --acme-ca-bundle file uploaded and its value pointing at the copy."""
    if "--acme-ca-bundle" not in flags:
        return flags
    at = flags.index("--acme-ca-bundle") + 1
    remote = f"{remote_dir}/{CA_BUNDLE_NAME}"
    data = Path(flags[at]).read_bytes()
    (machine["sh"]["-c", 'cat > "$1"', "upload", remote] << data)()
    return [*flags[:at], remote, *flags[at + 1:]]


def setup_argv(remote_dir: str, flags: list[str], user: str, verified: bool,
               check: bool = False, sudo_password: bool = False) -> list[str]:
    """As root the script runs itself; any other SETUP_USER runs it through sudo: `sudo -n`
    (NOPASSWD), or `sudo -S` reading SETUP_SUDO_PASSWORD from stdin, never from argv."""
    argv = ["bash", f"{remote_dir}/server_setup.sh", *flags]
    if user == "root":
        argv.append("--allow-root")  # doit setup was told to log in as root: that is intended
    elif sudo_password:
        argv = ["sudo", "-S", "-p", "", "--", *argv]
    else:
        argv = ["sudo", "-n", "--", *argv]
    if verified:
        argv.append("--deploy-key-verified")
    if check:
        argv.append("--check")
    return argv


def _upload(machine, remote_dir: str) -> None:
    """The script alone, as the guide copies it, its templates embedded from conf/ as it is
    now (so an edit of conf/ that was not regenerated yet still reaches the server)."""
    from scripts.embed_templates import current_script

    (machine["sh"]["-c", 'umask 077 && cat > "$1"', "sh", f"{remote_dir}/server_setup.sh"]
     << current_script())()


# apt's package configuration talks on stderr even when it works ("debconf: delaying package
# configuration, since apt-utils is not installed", "unable to initialize frontend").
_APT_NOISE = ("debconf: ", "dpkg-preconfigure: ")


def shown(line: str) -> bool:
    """Whether a line of server_setup.sh's output is worth a person's attention."""
    return not line.startswith(_APT_NOISE)


def _run_streaming(machine, argv: list[str], prefix: str, log,
                   password: str = "") -> tuple[int, list[str]]:
    """Run argv remotely and print its lines as they come (the first setup takes a minute)."""
    # stderr joins stdout remotely, so errors appear in order with the steps.
    command = machine["bash"]["-c", 'exec "$@" 2>&1', "setup", *argv]
    process = command.popen()
    if password:  # sudo -S reads its first line; the script reads no input
        process.stdin.write(f"{password}\n".encode())
    process.stdin.close()
    lines = []
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)  # kept whole: a failure's explanation may need every line
        if shown(line):
            log(f"{prefix}{line}")
    process.wait()
    return process.returncode, lines


def provision(setup_target: Target, deploy_target: Target, flags: list[str], check: bool,
              prefix: str = "", log=print, sudo_password: str = "") -> SetupOutcome:
    # Root runs the script itself: no sudo reads the password, so it is never sent (R22).
    user = setup_target.user
    password = sudo_password if user != "root" else ""
    with connect(setup_target) as machine:
        remote_dir = machine["mktemp"]["-d", "/tmp/server-setup.XXXXXX"]().strip()
        try:
            _upload(machine, remote_dir)
            flags = _upload_ca_bundle(machine, remote_dir, flags)
            status, lines = _run_streaming(
                machine, setup_argv(remote_dir, flags, user, verified=False, check=check,
                                    sudo_password=bool(password)), prefix, log, password)
            _raise_on_failure(status, lines, setup_target)
            if check:
                return SetupOutcome(setup_target, _changes(lines), lines)
            # Prove the deploy key before hardening SSH, so setup never locks anyone out.
            with connect(deploy_target) as deploy:
                deploy["echo"]["SSH works!"]()
            log(f"{prefix}ok: {deploy_target.user} logs in with its key")
            if not any(line.startswith(HARDENING_WAITS) for line in lines):
                return SetupOutcome(setup_target, _changes(lines), lines)
            status, more = _run_streaming(
                machine, setup_argv(remote_dir, flags, user, verified=True,
                                    sudo_password=bool(password)), prefix,
                lambda line: log(line) if not line.startswith(f"{prefix}ok:") else None, password)
            _raise_on_failure(status, more, setup_target)
            return SetupOutcome(setup_target, _changes(lines) + _changes(more), lines + more)
        finally:
            machine["rm"]["-rf", remote_dir].run(retcode=None)


def _changes(lines: list[str]) -> int:
    return sum(1 for line in lines if line.startswith(("changed:", "would change:")))


SUDO_WANTS_PASSWORD = "a password is required"
SUDO_REFUSED_PASSWORD = ("incorrect password", "no password was provided", "Sorry, try again")


def _raise_on_failure(status: int, lines: list[str], target: Target) -> None:
    if status != 0 and any(SUDO_WANTS_PASSWORD in line for line in lines):
        raise ToolkitError(f"setup on {target.display}: sudo asks {target.user} for a password; "
                           f"set SETUP_SUDO_PASSWORD, or give {target.user} NOPASSWD sudo")
    if status != 0 and any(word in line for line in lines for word in SUDO_REFUSED_PASSWORD):
        raise ToolkitError(f"setup on {target.display}: sudo refused SETUP_SUDO_PASSWORD for "
                           f"{target.user}; correct it (it is never printed)")
    if status != 0:
        errors = [line for line in lines if line.startswith("error:")]
        reason = errors[-1] if errors else (lines[-1] if lines else f"exit {status}")
        raise ToolkitError(f"setup on {target.display} failed: {reason}")
