"""The deployment package: a deterministic tar.gz of the app's shipped files, its wheels and a
manifest. Same sources, same bytes: sorted entries, fixed times and owners, bare gzip headers.

Layout inside:  <app files...>   wheels/*.whl   manifest.json
Next to it, dist/<app>.json (the build record) names the newest package for later tasks."""

from __future__ import annotations

import calendar
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts import TOOL_NAME, TOOL_VERSION
from scripts.build.sources import in_git_work_tree, shipped_files
from scripts.build.target import build_target
from scripts.build.wheels import ensure_wheels, requirements_hash
from scripts.errors import ToolkitError
from scripts.settings import Settings

MANIFEST_NAME = "manifest.json"
WHEELS_DIR = "wheels"
REQUIREMENTS = "requirements.txt"
GZIP_LEVEL = 6
# Wheels are zip files, compressed already: deflating them again gains ~0.5% and costs most of
# a build's CPU (~35 ms for a 0.9 MB package here). They go in a gzip member of their own that
# stores them as they are.
STORED = 0
PACKAGES_KEPT = 3


@dataclass(frozen=True)
class BuildRecord:
    """What `doit build` leaves in dist/<app>.json for check, deploy and CI artifacts."""
    app: str
    release_id: str
    package: str          # file name inside DIST_DIR
    sha256: str
    size: int
    file_count: int
    git_commit: str
    built_at: str
    python: str = ""      # the wheels' Python and platform
    platform: str = ""

    @classmethod
    def read(cls, path: Path) -> "BuildRecord":
        return cls(**json.loads(path.read_text()))


def app_name(settings: Settings) -> str:
    return settings.app_dir.resolve().name


def record_path(settings: Settings) -> Path:
    return settings.dist_dir / f"{app_name(settings)}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_app(app_dir: Path, files: list[str], wsgi_module: str = "wsgi") -> None:
    """What every deployable app must have; one line per missing piece."""
    if not app_dir.is_dir():
        raise ToolkitError(f"setting APP_DIR={str(app_dir)!r} is not a folder; point it at your "
                           f"Flask app")
    if REQUIREMENTS not in files:
        raise ToolkitError(f"build: APP_DIR {app_dir} has no {REQUIREMENTS} (tracked and not "
                           f"ignored); list the app's dependencies there, gunicorn included")
    if f"{wsgi_module}.py" not in files and f"{wsgi_module}/__init__.py" not in files:
        raise ToolkitError(f"build: APP_DIR {app_dir} has no WSGI entry {wsgi_module}.py; add one "
                           f"that defines `app` (e.g. `app = create_app()`)")
    for reserved in (MANIFEST_NAME, WHEELS_DIR + "/"):
        if any(f == reserved or f.startswith(reserved) for f in files):
            raise ToolkitError(f"build: APP_DIR {app_dir} has its own {reserved.rstrip('/')}, a "
                               f"name the package reserves; rename it or add it to .deployignore")


def _mode(path: Path) -> int:
    return 0o755 if os.stat(path).st_mode & 0o100 else 0o644


def _source_date(app_dir: Path) -> int:
    """Reproducible-builds convention: SOURCE_DATE_EPOCH, else the app's last commit time."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    if in_git_work_tree(app_dir):
        result = subprocess.run(["git", "-C", str(app_dir), "log", "-1", "--format=%ct", "--", "."],
                                capture_output=True, text=True)
        if result.stdout.strip().isdigit():
            return int(result.stdout.strip())
    return 0


def _git_commit(app_dir: Path) -> str:
    if not in_git_work_tree(app_dir):
        return ""
    head = subprocess.run(["git", "-C", str(app_dir), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(app_dir), "status", "--porcelain",
                            "--untracked-files=no", "--", "."],
                           capture_output=True, text=True).stdout.strip()
    return f"{head}-dirty" if head and dirty else head


def make_manifest(app: str, app_dir: Path, files: list[str], wheels: list[Path],
                  settings: Settings) -> dict:
    entries = [{"path": name, "sha256": sha256_file(app_dir / name),
                "size": (app_dir / name).stat().st_size, "mode": f"{_mode(app_dir / name):o}"}
               for name in files]
    wheel_entries = [{"path": f"{WHEELS_DIR}/{wheel.name}", "sha256": sha256_file(wheel),
                      "size": wheel.stat().st_size, "mode": "644"} for wheel in wheels]
    identity = {"files": entries, "wheels": wheel_entries, "python": settings.target_python,
                "platform": settings.target_platform}
    release_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    source_date = _source_date(app_dir)
    return {
        "app": app,
        "release_id": release_id,
        "build_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(source_date)),
        "tool": f"{TOOL_NAME} {TOOL_VERSION}",
        "target": {"python": settings.target_python, "platform": settings.target_platform},
        "requirements_sha256": requirements_hash(app_dir / REQUIREMENTS),
        "files": entries,
        "wheels": wheel_entries,
    }


def _tar_info(name: str, size: int, mode: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_package(destination: Path, app_dir: Path, manifest: dict, wheels: list[Path]) -> None:
    """Write the tar.gz byte for byte the same for the same manifest and files."""
    mtime = calendar.timegm(time.strptime(manifest["build_time"], "%Y-%m-%dT%H:%M:%SZ"))
    members = [(entry["path"], app_dir / entry["path"], int(entry["mode"], 8))
               for entry in manifest["files"]]
    members += [(f"{WHEELS_DIR}/{wheel.name}", wheel, 0o644) for wheel in wheels]
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    with open(destination, "wb") as raw, _GzipMembers(raw) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, source, mode in sorted(members):
            zipped.level = STORED if name.startswith(f"{WHEELS_DIR}/") else GZIP_LEVEL
            with open(source, "rb") as stream:
                tar.addfile(_tar_info(name, source.stat().st_size, mode, mtime), stream)
        zipped.level = GZIP_LEVEL
        tar.addfile(_tar_info(MANIFEST_NAME, len(manifest_bytes), 0o644, mtime),
                    io.BytesIO(manifest_bytes))


class _GzipMembers:
    """A write-only file of one gzip stream whose compression level may change between
    writes (set `level`): each change starts another gzip member, with a bare header. A
    stream of several members is one file to every gzip reader (RFC 1952; Python's gzip and
    tarfile, GNU tar), and the same writes give the same bytes."""

    def __init__(self, raw, level: int = GZIP_LEVEL):
        self.raw, self.level = raw, level
        self._member: gzip.GzipFile | None = None
        self._member_level = level
        self._written = 0

    def write(self, data) -> int:
        if self._member is None or self._member_level != self.level:
            self._end_member()
            self._member = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, mtime=0,
                                         compresslevel=self.level)
            self._member_level = self.level
        self._written += len(data)
        return self._member.write(data)

    def tell(self) -> int:  # tarfile asks where the archive starts
        return self._written

    def _end_member(self) -> None:
        if self._member is not None:
            self._member.close()  # its trailer; the file itself stays open
            self._member = None

    def __enter__(self) -> "_GzipMembers":
        return self

    def __exit__(self, *exc) -> None:
        self._end_member()


def size_report(manifest: dict) -> list[str]:
    entries = manifest["files"] + manifest["wheels"]
    largest = sorted(entries, key=lambda entry: entry["size"], reverse=True)[:5]
    return [f"  {entry['size'] / 1e6:8.2f} MB  {entry['path']}" for entry in largest]


def build_package(settings: Settings, log=print) -> BuildRecord:
    settings = build_target(settings)
    app_dir = settings.app_dir
    files = shipped_files(app_dir) if app_dir.is_dir() else []
    check_app(app_dir, files)
    wheels = ensure_wheels(app_dir / REQUIREMENTS, settings.wheel_cache, settings.target_python,
                           settings.target_platform, log)
    if not any(wheel.name.lower().startswith("gunicorn-") for wheel in wheels):
        raise ToolkitError(f"build: {app_dir / REQUIREMENTS} does not bring gunicorn; add it, "
                           f"since the server runs the app with gunicorn")
    app = app_name(settings)
    manifest = make_manifest(app, app_dir, files, wheels, settings)
    settings.dist_dir.mkdir(parents=True, exist_ok=True)
    package = settings.dist_dir / f"{app}-{manifest['release_id']}.tar.gz"
    partial = package.with_name(package.name + ".partial")
    count = len(manifest["files"]) + len(manifest["wheels"])
    try:
        write_package(partial, app_dir, manifest, wheels)
        size = partial.stat().st_size
        summary = (f"build: {package.name}: {size / 1e6:.2f} MB, {count} files "
                   f"({len(manifest['wheels'])} wheels); largest:")
        log(summary)
        for line in size_report(manifest):
            log(line)
        if size > settings.package_max_mb * 1e6:
            raise ToolkitError(f"build: package is {size / 1e6:.2f} MB, over PACKAGE_MAX_MB="
                               f"{settings.package_max_mb:g}; add what should not ship (see "
                               f"the largest files above) to {app_dir}/.deployignore")
        os.replace(partial, package)
    except BaseException:
        # Over the limit, Ctrl-C, a closed output pipe: no half-built package stays in dist/
        # (old packages are pruned by name; a .partial never would be).
        partial.unlink(missing_ok=True)
        raise
    record = BuildRecord(app=app, release_id=manifest["release_id"], package=package.name,
                         sha256=sha256_file(package), size=size, file_count=count,
                         git_commit=_git_commit(app_dir),
                         built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         python=settings.target_python, platform=settings.target_platform)
    record_path(settings).write_text(json.dumps(asdict(record), indent=2) + "\n")
    _prune_old_packages(settings.dist_dir, app, keep=package.name)
    return record


def _prune_old_packages(dist_dir: Path, app: str, keep: str) -> None:
    packages = sorted(dist_dir.glob(f"{app}-*.tar.gz"), key=lambda p: p.stat().st_mtime,
                      reverse=True)
    for old in [p for p in packages if p.name != keep][PACKAGES_KEPT - 1:]:
        old.unlink()


def verify_package(package: Path) -> dict:
    """The manifest, once every member's sha256 matches it and nothing is missing or extra."""
    try:
        with tarfile.open(package, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers()}
            if MANIFEST_NAME not in members:
                raise ToolkitError(f"package {package.name} has no {MANIFEST_NAME}; rebuild it "
                                   f"with `doit build`")
            manifest = json.load(tar.extractfile(members[MANIFEST_NAME]))
            expected = {e["path"]: e["sha256"] for e in manifest["files"] + manifest["wheels"]}
            actual = {name: hashlib.sha256(tar.extractfile(member).read()).hexdigest()
                      for name, member in members.items() if name != MANIFEST_NAME}
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as error:
        raise ToolkitError(f"package {package.name} is unreadable ({error}); rebuild it with "
                           f"`doit build`") from None
    unsafe = [name for name in actual if name.startswith("/") or ".." in name.split("/")]
    if unsafe:
        raise ToolkitError(f"package {package.name} holds an unsafe path {unsafe[0]!r}; refusing "
                           f"to unpack it")
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            what = "missing" if name not in actual else ("unexpected" if name not in expected
                                                          else "sha256 mismatch")
            raise ToolkitError(f"package {package.name}: {name}: {what} against its manifest; "
                               f"the package is corrupt, rebuild it with `doit build`")
    return manifest
