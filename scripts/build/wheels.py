"""Dependencies travel as wheels: servers have no package index. Wheels are downloaded for the
server's Python and platform, once per requirements content, into a local cache."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.errors import ToolkitError

COMPLETE_MARKER = ".complete"
OLDEST_MANYLINUX_GLIBC_MINOR = 17


def platform_tags(target_platform: str) -> list[str]:
    """pip takes exact tags only: a manylinux_2_36 server also runs manylinux_2_17..2_35 wheels."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", target_platform)
    if not match:
        return [target_platform]
    newest, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}"
            for minor in range(newest, OLDEST_MANYLINUX_GLIBC_MINOR - 1, -1)]
    return tags + [f"manylinux2014_{arch}"]


def requirements_hash(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def download_argv(requirements: Path, destination: Path, python: str, platform: str) -> list[str]:
    abi = "cp" + python.replace(".", "")
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", abi, "-r", str(requirements), "-d", str(destination)]
    for tag in platform_tags(platform):
        argv += ["--platform", tag]
    return argv


def ensure_wheels(requirements: Path, cache_root: Path, python: str, platform: str,
                  log=print) -> list[Path]:
    """Wheel files for these requirements; downloaded only when this combination is new."""
    key = hashlib.sha256(f"{requirements_hash(requirements)}|{python}|{platform}".encode())
    cached = cache_root / key.hexdigest()[:20]
    if not (cached / COMPLETE_MARKER).exists():
        log(f"build: downloading wheels for Python {python} on {platform} (requirements changed)")
        downloading = cached.with_name(cached.name + ".downloading")
        shutil.rmtree(downloading, ignore_errors=True)
        downloading.mkdir(parents=True)
        result = subprocess.run(download_argv(requirements, downloading, python, platform),
                                capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
            reason = errors[0] if errors else result.stderr.strip().splitlines()[-1:]
            raise ToolkitError(f"build: no wheels for {requirements} on Python {python} / "
                               f"{platform}: {reason}; every requirement needs a wheel "
                               f"(check TARGET_PYTHON and TARGET_PLATFORM)")
        (downloading / COMPLETE_MARKER).write_text("")
        shutil.rmtree(cached, ignore_errors=True)
        downloading.rename(cached)
    return sorted(cached.glob("*.whl"))
