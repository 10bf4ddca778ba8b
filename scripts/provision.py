"""`doit setup`: upload server_setup.sh and conf/ to each server and run them there over SSH,
prove the deploy key logs in, then run once more so SSH hardening can apply."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.remote import Target, connect
from scripts.settings import REPO_ROOT, Settings

SETUP_SCRIPT = REPO_ROOT / "server_setup.sh"
CONF_DIR = REPO_ROOT / "conf"
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


def setup_argv(remote_dir: str, flags: list[str], as_root: bool, verified: bool,
               check: bool = False) -> list[str]:
    argv = ["bash", f"{remote_dir}/server_setup.sh", "--conf-dir", f"{remote_dir}/conf", *flags]
    if as_root:
        argv.append("--allow-root")  # doit setup was told to log in as root: that is intended
    if verified:
        argv.append("--deploy-key-verified")
    if check:
        argv.append("--check")
    return argv


def script_fingerprint() -> str:
    """Changes whenever the script or a template changes, so `doit setup` runs again."""
    digest = hashlib.sha256(SETUP_SCRIPT.read_bytes())
    for template in sorted(CONF_DIR.iterdir()):
        digest.update(template.name.encode() + template.read_bytes())
    return digest.hexdigest()


def _upload(machine, remote_dir: str) -> None:
    archive = subprocess.run(["tar", "-C", str(REPO_ROOT), "-czf", "-", "server_setup.sh",
                              "conf"], capture_output=True, check=True).stdout
    (machine["tar"]["-xzf", "-", "-C", remote_dir] << archive)()


# apt's package configuration talks on stderr even when it works ("debconf: delaying package
# configuration, since apt-utils is not installed", "unable to initialize frontend").
_APT_NOISE = ("debconf: ", "dpkg-preconfigure: ")


def shown(line: str) -> bool:
    """Whether a line of server_setup.sh's output is worth a person's attention."""
    return not line.startswith(_APT_NOISE)


def _run_streaming(machine, argv: list[str], prefix: str, log) -> tuple[int, list[str]]:
    """Run argv remotely and print its lines as they come (the first setup takes a minute)."""
    # stderr joins stdout remotely, so errors appear in order with the steps.
    command = machine["bash"]["-c", 'exec "$@" 2>&1', "setup", *argv]
    process = command.popen()
    lines = []
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)  # kept whole: a failure's explanation may need every line
        if shown(line):
            log(f"{prefix}{line}")
    process.wait()
    return process.returncode, lines


def provision(setup_target: Target, deploy_target: Target, flags: list[str], check: bool,
              prefix: str = "", log=print) -> SetupOutcome:
    with connect(setup_target) as machine:
        remote_dir = machine["mktemp"]["-d", "/tmp/server-setup.XXXXXX"]().strip()
        try:
            _upload(machine, remote_dir)
            flags = _upload_ca_bundle(machine, remote_dir, flags)
            as_root = setup_target.user == "root"
            status, lines = _run_streaming(
                machine, setup_argv(remote_dir, flags, as_root, verified=False, check=check),
                prefix, log)
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
                machine, setup_argv(remote_dir, flags, as_root, verified=True), prefix,
                lambda line: log(line) if not line.startswith(f"{prefix}ok:") else None)
            _raise_on_failure(status, more, setup_target)
            return SetupOutcome(setup_target, _changes(lines) + _changes(more), lines + more)
        finally:
            machine["rm"]["-rf", remote_dir].run(retcode=None)


def _changes(lines: list[str]) -> int:
    return sum(1 for line in lines if line.startswith(("changed:", "would change:")))


def _raise_on_failure(status: int, lines: list[str], target: Target) -> None:
    if status != 0:
        errors = [line for line in lines if line.startswith("error:")]
        reason = errors[-1] if errors else (lines[-1] if lines else f"exit {status}")
        raise ToolkitError(f"setup on {target.display} failed: {reason}")
