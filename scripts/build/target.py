"""Which Python and wheel platform a package is built for: TARGET_PYTHON / TARGET_PLATFORM when
set, else what the servers reported (`doit target`, run by `doit deploy` before the build and
kept in DIST_DIR/target.json), else Debian 12 on this machine's architecture.

So a deploy to a Debian 13 server ships cp313 wheels, and one from an arm64 laptop to an x86_64
server ships x86_64 wheels, with no setting to get right."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, replace
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.settings import Settings

TARGET_FILE = "target.json"
FALLBACK_PYTHON = "3.11"   # Debian 12
FALLBACK_GLIBC = "2.36"    # Debian 12; older manylinux levels match too (see wheels.platform_tags)


@dataclass(frozen=True)
class ServerFacts:
    """What one server's own Python reports (the server tool's probe)."""
    server: str
    python: str    # "3.13"
    machine: str   # "x86_64", "aarch64"
    glibc: str     # "2.41"; empty on a libc that is not glibc

    @property
    def platform(self) -> str:
        if not re.fullmatch(r"\d+\.\d+", self.glibc):
            return f"linux_{self.machine}"
        major, minor = self.glibc.split(".")
        return f"manylinux_{major}_{minor}_{self.machine}"


def target_file(settings: Settings) -> Path:
    return settings.dist_dir / TARGET_FILE


def fleet_target(facts: list[ServerFacts]) -> dict:
    """One package serves every server: they must agree on Python and architecture. Wheels for
    the oldest glibc among them run on all."""
    pythons = {fact.python for fact in facts}
    machines = {fact.machine for fact in facts}
    if len(pythons) > 1 or len(machines) > 1:
        seen = ", ".join(f"{f.server} Python {f.python} {f.machine}" for f in facts)
        raise ToolkitError(f"the servers differ ({seen}); one package serves one Python and "
                           f"architecture: deploy them separately (DEPLOY_SERVER), or set "
                           f"TARGET_PYTHON and TARGET_PLATFORM for the oldest")
    oldest = min(facts, key=lambda fact: tuple(int(p) for p in fact.glibc.split(".") if p.isdigit())
                 or (0,))
    return {"python": oldest.python, "platform": oldest.platform}


def record_fleet_target(settings: Settings, facts: list[ServerFacts]) -> tuple[dict, bool]:
    """Write DIST_DIR/target.json; (target, changed). Unchanged content leaves the file alone."""
    target = fleet_target(facts)
    path = target_file(settings)
    text = json.dumps(target, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return target, False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return target, True


def recorded_target(settings: Settings) -> dict:
    try:
        data = json.loads(target_file(settings).read_text())
        return {"python": str(data["python"]), "platform": str(data["platform"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def build_target(settings: Settings) -> Settings:
    """The settings with TARGET_PYTHON and TARGET_PLATFORM filled in as the build uses them."""
    recorded = recorded_target(settings)
    python = settings.target_python or recorded.get("python") or FALLBACK_PYTHON
    wheel_platform = (settings.target_platform or recorded.get("platform")
                      or f"manylinux_{FALLBACK_GLIBC.replace('.', '_')}_{platform.machine()}")
    return replace(settings, target_python=python, target_platform=wheel_platform)
