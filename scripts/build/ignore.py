"""`.deployignore`: gitignore-style rules for what never ships, with sensible defaults.

Supported: `#` comments, `!` negation, a trailing `/` for directories only, and a `/` inside a
pattern to anchor it to APP_DIR; other patterns match a name at any depth."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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


@dataclass(frozen=True)
class Rule:
    pattern: str
    negated: bool
    directory_only: bool
    anchored: bool

    def matches(self, path: PurePosixPath, is_dir: bool) -> bool:
        if self.directory_only and not is_dir:
            return False
        if self.anchored:
            return fnmatch.fnmatchcase(str(path), self.pattern)
        return fnmatch.fnmatchcase(path.name, self.pattern)


def parse_rules(text: str) -> list[Rule]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!")
        directory_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        rules.append(Rule(line.lstrip("/"), negated, directory_only, anchored))
    return rules


class IgnoreRules:
    """The defaults plus APP_DIR/.deployignore; later rules win, as in .gitignore."""

    def __init__(self, app_dir: Path):
        text = DEFAULT_RULES
        custom = app_dir / IGNORE_FILE
        if custom.is_file():
            text += "\n" + custom.read_text()
        self.rules = parse_rules(text)

    def _ignores_itself(self, path: PurePosixPath, is_dir: bool) -> bool:
        ignored = False
        for rule in self.rules:
            if rule.matches(path, is_dir):
                ignored = not rule.negated
        return ignored

    def ignores(self, relative_path: str, is_dir: bool = False) -> bool:
        """True when the path or any folder above it is ignored."""
        path = PurePosixPath(relative_path)
        for parent in reversed(path.parents[:-1]):
            if self._ignores_itself(parent, is_dir=True):
                return True
        return self._ignores_itself(path, is_dir)
