"""The bare Debian image every sandbox server boots from: built once per Debian release with
debootstrap, cached.

It holds what a fresh VPS has (systemd, OpenSSH, sudo) and nothing that server_setup.sh installs,
so provisioning is tested against the real starting point."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.sandbox.mirror import DebianMirror

# Debian releases a sandbox server can run, and how long debootstrap takes for each here.
SUITES = {"bookworm": "Debian 12, about 70-95 s", "trixie": "Debian 13, about 50 s"}
DEFAULT_SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "sudo", "ca-certificates",
            "iproute2")
# apt inside a server reaches the mirror through a socat bridge on this loopback port.
APT_PROXY_PORT = 3142
COMPLETE_MARKER = ".sandbox-image-complete"
# Like a cloud image's default user: full sudo without a password, the provider's SSH key.
ADMIN_USER = "admin"

APT_PROXY_CONF = f'Acquire::http::Proxy "http://127.0.0.1:{APT_PROXY_PORT}";\n'


def image_name(mirror: DebianMirror, suite: str = DEFAULT_SUITE) -> str:
    """Name of the image folder: changes whenever the recipe changes, so a stale image is never used."""
    recipe = "|".join([suite, mirror.archive, *PACKAGES, mirror.sources_list(suite),
                       APT_PROXY_CONF, ADMIN_USER, "v2"])
    return f"debian-{suite}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def ensure_image(cache_dir: Path, mirror: DebianMirror, suite: str = DEFAULT_SUITE,
                 log=print) -> Path:
    """The cached image folder of this Debian release, built first if missing. Safe to call from
    parallel processes."""
    image_dir = cache_dir / "images" / image_name(mirror, suite)
    if (image_dir / COMPLETE_MARKER).exists():
        return image_dir
    image_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(image_dir.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (image_dir / COMPLETE_MARKER).exists():
            _build(image_dir, mirror, suite, log)
    return image_dir


def _build(image_dir: Path, mirror: DebianMirror, suite: str, log) -> None:
    building = image_dir.with_name(image_dir.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(image_dir, ignore_errors=True)
    log(f"sandbox: building the {suite} image ({SUITES[suite]}) with debootstrap (once) into "
        f"{image_dir}")
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite,
            str(building), mirror.archive]
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-15:])
        print(tail, file=sys.stderr)
        raise ToolkitError(f"sandbox: debootstrap failed (exit {result.returncode}) while building "
                           f"the image from {mirror.archive}; see the lines above (is the mirror reachable? "
                           f"set SANDBOX_MIRROR)")
    _customise(building, mirror.sources_list(suite))
    building.rename(image_dir)
    (image_dir / COMPLETE_MARKER).write_text(" ".join(argv) + "\n")


def _customise(root: Path, sources_list: str) -> None:
    # Downloaded .debs are dead weight in every copy; servers share one archive cache instead.
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "etc/apt/sources.list").write_text(sources_list)
    (root / "etc/apt/apt.conf.d/01sandbox-proxy").write_text(APT_PROXY_CONF)
    # Each server gets its own identity at first boot: machine id and SSH host keys.
    (root / "etc/machine-id").write_text("")
    for host_key in (root / "etc/ssh").glob("ssh_host_*"):
        host_key.unlink()
    subprocess.run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash",
                    "--groups", "sudo", ADMIN_USER], check=True)
    sudoers = root / "etc/sudoers.d/90-sandbox-admin"
    sudoers.write_text(f"{ADMIN_USER} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
