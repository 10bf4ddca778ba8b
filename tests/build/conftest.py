"""Build tests run the real `doit build` (and pip, for wheels) on copies of the bundled app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.settings import REPO_ROOT

HELPDESK = REPO_ROOT / "examples" / "helpdesk"
DOIT = [sys.executable, "-m", "doit", "-f", str(REPO_ROOT / "dodo.py")]


def copy_app(destination: Path, source: Path = HELPDESK) -> Path:
    shutil.copytree(source, destination,
                    ignore=shutil.ignore_patterns("__pycache__", "instance", "tests"))
    return destination


class Project:
    """A working folder with its own app copy, dist/ and doit state, built with real doit."""

    def __init__(self, root: Path, wheel_cache: Path, app_dir: Path | None = None):
        self.root = root
        self.app_dir = app_dir or copy_app(root / "helpdesk")
        self.dist_dir = root / "dist"
        self.env = {**os.environ, "APP_DIR": str(self.app_dir), "DIST_DIR": str(self.dist_dir),
                    "WHEEL_CACHE": str(wheel_cache), "PYTHONPATH": str(REPO_ROOT)}

    def doit(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*DOIT, "--dir", str(self.root), *args], capture_output=True,
                              text=True, env={**self.env, **env}, timeout=300)

    def build(self, **env: str) -> subprocess.CompletedProcess:
        return self.doit("build", **env)

    def package(self) -> Path:
        (package,) = self.dist_dir.glob("helpdesk-*.tar.gz")
        return package


@pytest.fixture()
def project(tmp_path, wheel_cache):
    return Project(tmp_path, wheel_cache)
