"""`.deployignore`: what never ships, with sensible defaults, in .gitignore's own syntax and
meaning (the `pathspec` library): `#` comments, `!` negation, `**`, a trailing `/` for folders
only, and a `/` at the start or in the middle anchoring a pattern to APP_DIR."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pathspec

IGNORE_FILE = ".deployignore"

DEFAULT_RULES = """
# version control, secrets and local state
.git/
.hg/
.svn/
.env
.env.*
!.env.example
*.db
*.db-journal
*.sqlite
*.sqlite3
*.sqlite3-wal
*.sqlite3-shm
instance/
uploads/
# environments, dependencies and caches (a folder holding pyvenv.cfg is always skipped too)
.venv/
venv/
node_modules/
__pycache__/
*.py[cod]
.pytest_cache/
.mypy_cache/
.ruff_cache/
.tox/
.nox/
.cache/
.coverage
htmlcov/
# logs, tests, build output, editors
*.log
logs/
tests/
test/
conftest.py
pytest.ini
tox.ini
dist/
build/
*.egg-info/
.idea/
.vscode/
.DS_Store
*.swp
*~
.deployignore
"""


class IgnoreRules:
    """The defaults plus APP_DIR/.deployignore; later rules win, as in .gitignore."""

    def __init__(self, app_dir: Path):
        text = DEFAULT_RULES
        custom = app_dir / IGNORE_FILE
        if custom.is_file():
            text += "\n" + custom.read_text()
        self.spec = pathspec.GitIgnoreSpec.from_lines(text.splitlines())

    def _ignores_itself(self, path: PurePosixPath, is_dir: bool) -> bool:
        # A trailing '/' is how a directory-only pattern (`build/`) knows a folder from a file.
        return self.spec.match_file(f"{path}/" if is_dir else str(path))

    def ignores(self, relative_path: str, is_dir: bool = False) -> bool:
        """True when the path or any folder above it is ignored: as in git, a file cannot be
        re-included (`!`) once a folder above it is excluded."""
        path = PurePosixPath(relative_path)
        for parent in reversed(path.parents[:-1]):
            if self._ignores_itself(parent, is_dir=True):
                return True
        return self._ignores_itself(path, is_dir)
