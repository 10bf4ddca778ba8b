"""Which files of APP_DIR ship: git's tracked files when APP_DIR is in a git work tree, otherwise a
walk of the folder; minus the ignore rules. Virtualenvs are skipped wherever they are."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scripts.build.ignore import IgnoreRules


def in_git_work_tree(app_dir: Path) -> bool:
    try:
        result = subprocess.run(["git", "-C", str(app_dir), "rev-parse",
                                 "--is-inside-work-tree"], capture_output=True, text=True)
    except FileNotFoundError:  # no git installed: not a work tree as far as we can tell
        return False
    return result.returncode == 0 and result.stdout.strip() == "true"


def shipped_files(app_dir: Path) -> list[str]:
    """Sorted paths (relative to APP_DIR, with '/') of the files that go into the package."""
    rules = IgnoreRules(app_dir)
    candidates = _git_files(app_dir) if in_git_work_tree(app_dir) else _walk(app_dir, rules)
    return sorted(path for path in candidates
                  if not rules.ignores(path) and not _inside_virtualenv(app_dir, path)
                  and (app_dir / path).is_file())


def _git_files(app_dir: Path) -> list[str]:
    output = subprocess.run(["git", "-C", str(app_dir), "ls-files", "-z", "--cached"],
                            capture_output=True, check=True).stdout
    return [name for name in output.decode().split("\0") if name]


def _walk(app_dir: Path, rules: IgnoreRules) -> list[str]:
    found = []
    for folder, subfolders, files in os.walk(app_dir):
        relative = Path(folder).relative_to(app_dir)
        # Prune ignored folders here, so a 100 MB virtualenv is never even listed.
        subfolders[:] = sorted(
            name for name in subfolders
            if not rules.ignores((relative / name).as_posix(), is_dir=True)
            and not (Path(folder) / name / "pyvenv.cfg").exists())
        found += [(relative / name).as_posix() for name in files]
    return found


def _inside_virtualenv(app_dir: Path, relative_path: str) -> bool:
    parent = (app_dir / relative_path).parent
    while parent != app_dir and app_dir in parent.parents:
        if (parent / "pyvenv.cfg").exists():
            return True
        parent = parent.parent
    return False
