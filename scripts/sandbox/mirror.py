"""Which Debian mirror sandbox servers use: SANDBOX_MIRROR, else the one this machine's own apt
already uses (/etc/apt/sources.list, sources.list.d/*.list and deb822 *.sources). Users behind
their own mirror or caching proxy get theirs; no mirror host is written into the toolkit.

Servers reach the mirror through one TCP bridge to its host and port (apt talks to it as to an
HTTP proxy), so the mirror must be plain http:// and the security archive is used only when it
lives on the same host and port."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scripts.errors import ToolkitError

APT_DIR = Path("/etc/apt")
# Debian's release names and aliases: what tells a Debian archive from another vendor's.
DEBIAN_SUITES = frozenset({
    "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable",
})


@dataclass(frozen=True)
class AptSource:
    """One `deb` line (a deb822 stanza gives one per URI)."""
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_one_line_sources(text: str) -> list[AptSource]:
    """`deb [options] URI SUITE COMPONENT...` lines; deb-src, comments and options skipped."""
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [arch=amd64 signed-by=...]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            sources.append(AptSource(words[1], (words[2],), tuple(words[3:])))
    return sources


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Stanzas of `Types:`, `URIs:`, `Suites:`, `Components:`; `Enabled: no` ones skipped."""
    sources = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        name = ""
        for line in stanza.splitlines():
            if line.lstrip().startswith("#"):
                continue
            if line[:1] in (" ", "\t") and name:  # a continuation line
                fields[name] += " " + line.strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                fields[name] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        sources += [AptSource(uri, suites, components) for uri in fields.get("uris", "").split()]
    return sources


def read_apt_sources(apt_dir: Path = APT_DIR) -> list[AptSource]:
    """Every `deb` source of this machine, in apt's own order of files."""
    sources = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        sources += parse_one_line_sources(main_list.read_text(errors="replace"))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line_sources(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                sources += parse_deb822_sources(path.read_text(errors="replace"))
    return sources


def _release(suite: str) -> tuple[str, bool]:
    """("bookworm", is_security) for bookworm, bookworm-updates, bookworm-security, .../updates."""
    base = re.split(r"[-/]", suite, maxsplit=1)[0]
    return base, suite.endswith("-security") or suite.endswith("/updates")


@dataclass(frozen=True)
class DebianMirror:
    archive: str        # e.g. http://<host>/debian, no trailing slash
    security: str = ""  # the security archive on the same host and port, if known

    @property
    def host(self) -> str:
        return urlsplit(self.archive).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.archive).port or 80

    def sources_list(self, suite: str) -> str:
        """A server's /etc/apt/sources.list for this Debian release."""
        lines = [f"deb {self.archive} {suite} main", f"deb {self.archive} {suite}-updates main"]
        if self.security:
            lines.append(f"deb {self.security} {suite}-security main")
        return "\n".join(lines) + "\n"


def _same_place(first: str, second: str) -> bool:
    a, b = urlsplit(first), urlsplit(second)
    return (a.hostname, a.port or 80) == (b.hostname, b.port or 80)


def _bridgeable(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "http" and bool(parts.hostname)


def mirror_from_sources(sources: list[AptSource]) -> DebianMirror | None:
    """The first plain-http Debian archive with `main`, and its security archive if beside it."""
    archives, security = [], []
    for source in sources:
        if "main" not in source.components:
            continue
        for suite in source.suites:
            base, is_security = _release(suite)
            if base in DEBIAN_SUITES:
                (security if is_security else archives).append(source.uri.rstrip("/"))
    for archive in (uri for uri in archives if _bridgeable(uri)):
        beside = [uri for uri in security if _bridgeable(uri) and _same_place(uri, archive)]
        return DebianMirror(archive, beside[0] if beside else "")
    return None


def resolve_mirror(setting: str, apt_dir: Path = APT_DIR) -> DebianMirror:
    """SANDBOX_MIRROR if set, else this machine's apt sources; one clear line when neither works."""
    sources = read_apt_sources(apt_dir)
    if setting:
        archive = setting.rstrip("/")
        if not _bridgeable(archive):
            raise ToolkitError(f"setting SANDBOX_MIRROR={setting!r} must be a plain http:// URL "
                               f"of a Debian mirror (sandbox servers reach it through a TCP "
                               f"bridge, as an HTTP proxy)")
        found = mirror_from_sources(sources)
        security = found.security if found and _same_place(found.security, archive) else ""
        return DebianMirror(archive, security)
    found = mirror_from_sources(sources)
    if found is None:
        others = sorted({s.uri for s in sources})
        seen = f" (found only {', '.join(others)})" if others else ""
        raise ToolkitError(f"sandbox: no plain http:// Debian mirror in this machine's apt "
                           f"sources in {apt_dir}{seen}; set SANDBOX_MIRROR to one, such as "
                           f"http://<your-mirror>/debian")
    return found
