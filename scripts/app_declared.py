"""What the app declares about its own deploy: APP_DIR/pyproject.toml, table [tool.flask-deploy].
Only settings that describe the app (how it migrates, where it answers health) live there, so they
travel with the app's code; .env and the environment still override them (scripts/settings.py)."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

PYPROJECT = "pyproject.toml"
TABLE = "[tool.flask-deploy]"
# key -> the setting it gives a value to
KEYS = {"migrate-command": "MIGRATE_COMMAND", "migrations-paths": "MIGRATIONS_PATHS",
        "health-path": "HEALTH_PATH"}


def declared_settings(app_dir: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """{SETTING: (key, raw text)} for each key the app's table gives, and one problem line per
    key (or file) that cannot be read. No pyproject.toml, or no such table: nothing."""
    pyproject = app_dir / PYPROJECT
    if not pyproject.is_file():
        return {}, []
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as error:
        return {}, [f"{pyproject} cannot be read as TOML ({error}); fix it, or point APP_DIR "
                    f"at the app"]
    tool = data.get("tool", {})
    table = tool.get("flask-deploy") if isinstance(tool, dict) else None
    if table is None:
        return {}, []
    if not isinstance(table, dict):
        return {}, [f"{pyproject}: tool.flask-deploy must be a table, {TABLE}, holding "
                    f"{_key_list()}; fix it there"]
    declared: dict[str, tuple[str, str]] = {}
    problems = []
    for key, value in table.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.75)
            meant = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{pyproject}: {TABLE} key {key!r} is unknown; {meant}the toolkit "
                            f"reads {_key_list()} there (the servers' settings belong in .env); "
                            f"rename or remove it")
            continue
        text = _as_text(key, value)
        if text is None:
            kind = ("a list of strings or a comma-separated string"
                    if key == "migrations-paths" else "a string")
            problems.append(f"{pyproject}: {TABLE} {key} = {value!r} must be {kind}; fix it "
                            f"there")
            continue
        declared[KEYS[key]] = (key, text)
    return declared, problems


def _as_text(key: str, value: object) -> str | None:
    """The value as the setting's own text (a list of paths joined by commas), or None."""
    if isinstance(value, str):
        return value
    if key == "migrations-paths" and isinstance(value, list) and all(
            isinstance(item, str) and "," not in item for item in value):
        return ",".join(value)
    return None


def _key_list() -> str:
    names = list(KEYS)
    return ", ".join(names[:-1]) + " and " + names[-1]
