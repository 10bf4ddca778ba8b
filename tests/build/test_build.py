"""`doit build`: only on change, deterministic, nothing that must not ship, size-limited."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
import zlib

import pytest

from scripts.build.package import BuildRecord, verify_package
from scripts.errors import ToolkitError
from tests.build.conftest import Project


def members(package) -> list[str]:
    with tarfile.open(package) as tar:
        return tar.getnames()


def test_second_build_with_nothing_changed_runs_nothing(project):
    first = project.build()
    assert first.returncode == 0, first.stderr
    assert ".  build" in first.stdout
    second = project.build()
    assert second.returncode == 0, second.stderr
    assert "-- build" in second.stdout, "doit must report the build up to date"
    assert "build: " not in second.stdout


def test_a_one_line_change_rebuilds_with_a_new_release_id(project):
    assert project.build().returncode == 0
    before = BuildRecord.read(project.dist_dir / "helpdesk.json")
    views = project.app_dir / "helpdesk" / "views.py"
    views.write_text(views.read_text() + "\n# a one-line change\n")
    again = project.build()
    assert again.returncode == 0 and ".  build" in again.stdout
    after = BuildRecord.read(project.dist_dir / "helpdesk.json")
    assert after.release_id != before.release_id
    assert (project.dist_dir / after.package).exists()


def test_a_deleted_package_is_built_again(project):
    assert project.build().returncode == 0
    project.package().unlink()
    assert ".  build" in project.build().stdout
    assert project.package().exists()


def test_same_sources_give_a_byte_identical_package(tmp_path, wheel_cache):
    first = Project(tmp_path / "one", wheel_cache)
    second = Project(tmp_path / "two", wheel_cache)
    os.utime(second.app_dir / "wsgi.py", (1, 1))  # other mtimes must not matter
    assert first.build().returncode == 0 and second.build().returncode == 0
    one, two = BuildRecord.read(first.dist_dir / "helpdesk.json"), \
        BuildRecord.read(second.dist_dir / "helpdesk.json")
    assert one.release_id == two.release_id
    assert one.sha256 == two.sha256
    assert first.package().read_bytes() == second.package().read_bytes()


def test_package_has_manifest_wheels_and_the_app(project):
    assert project.build().returncode == 0
    package = project.package()
    names = members(package)
    assert "manifest.json" in names and "wsgi.py" in names and "requirements.txt" in names
    assert "pyproject.toml" in names  # the app's [tool.flask-deploy] ships with it, harmless
    assert any(n.startswith("wheels/gunicorn-") for n in names)
    assert any(n.startswith("wheels/flask-") for n in names)
    manifest = verify_package(package)
    assert manifest["release_id"] in package.name
    assert manifest["target"] == {"python": "3.11", "platform": manifest["target"]["platform"]}
    assert {"build_time", "tool", "requirements_sha256", "files", "wheels"} <= set(manifest)
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"])


def gzip_members(data: bytes) -> list[tuple[int, bytes]]:
    """The gzip members of a file: each one's deflate block type (0: stored as is) and what it
    holds, decompressed."""
    found = []
    while data:
        # A bare header (no name, no extra fields) is 10 bytes; the first block's type is in
        # bits 1-2 of the byte after it.
        block_type = (data[10] >> 1) & 0b11
        unpacker = zlib.decompressobj(wbits=31)
        found.append((block_type, unpacker.decompress(data)))
        data = unpacker.unused_data
    return found


def test_wheels_are_stored_as_they_are_and_the_app_deflated(project):
    """Wheels are zip files already: deflating them again would gain ~0.5% for most of the
    build's CPU. They sit in a gzip member of their own that stores them; one file for every
    gzip reader."""
    assert project.build().returncode == 0
    package = project.package()
    members = gzip_members(package.read_bytes())
    wheel = next(n for n in tarfile.open(package).getnames() if n.startswith("wheels/"))
    stored = [held for block_type, held in members if block_type == 0]
    assert len(stored) == 1 and wheel.encode() in stored[0]
    assert all(b"helpdesk/views.py" not in held for held in stored)  # the app: deflated
    assert b"".join(held for _, held in members) == gzip.decompress(package.read_bytes())
    verify_package(package)


def make_bloated(app_dir):
    """The guide's 127 MB project: virtualenv, git, node_modules, caches, logs, secrets, a DB."""
    venv = app_dir / ".venv"
    (venv / "lib").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    with open(venv / "lib" / "libbig.so", "wb") as big:
        big.write(os.urandom(1 << 20) * 105)  # 105 MB of real bytes
    for folder, name, size in [(".git/objects", "pack", 8 << 20),
                               ("node_modules/left-pad", "index.js", 6 << 20),
                               ("helpdesk/__pycache__", "views.cpython-311.pyc", 200_000),
                               ("logs", "app.log", 5 << 20), ("instance", "helpdesk.sqlite3",
                                                              3 << 20),
                               ("tests", "test_more.py", 1000)]:
        (app_dir / folder).mkdir(parents=True, exist_ok=True)
        (app_dir / folder / name).write_bytes(b"x" * size)
    (app_dir / ".env").write_text("HELPDESK_SECRET_KEY=do-not-ship-me\n")
    (app_dir / "error.log").write_text("old errors\n")


def folder_size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_bloated_127_mb_app_builds_a_small_clean_package(project):
    make_bloated(project.app_dir)
    assert folder_size(project.app_dir) > 127e6
    result = project.build()
    assert result.returncode == 0, result.stderr
    names = members(project.package())
    forbidden = (".venv/", ".git/", "node_modules/", "__pycache__/", "logs/", "instance/",
                 "tests/", ".env", "error.log")
    assert not [n for n in names if any(n.startswith(f) or f"/{f}" in n for f in forbidden)]
    manifest = verify_package(project.package())
    assert sum(entry["size"] for entry in manifest["files"]) < 1e6
    with tarfile.open(project.package()) as tar:
        assert all(b"do-not-ship-me" not in tar.extractfile(m).read()
                   for m in tar.getmembers())


def test_in_git_only_tracked_files_ship_and_committed_secrets_still_stay_out(project):
    app = project.app_dir
    git = ["git", "-C", str(app), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (app / ".env").write_text("HELPDESK_SECRET_KEY=committed-by-mistake\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "app"], check=True)
    (app / "scratch.py").write_text("print('not tracked')\n")
    assert project.build().returncode == 0
    names = members(project.package())
    assert "scratch.py" not in names and ".env" not in names and "wsgi.py" in names
    record = BuildRecord.read(project.dist_dir / "helpdesk.json")
    assert record.git_commit and not record.git_commit.endswith("-dirty")


def test_over_the_size_limit_fails_with_the_largest_files(project):
    result = project.build(PACKAGE_MAX_MB="0.1")
    assert result.returncode != 0
    assert "over PACKAGE_MAX_MB=0.1" in result.stderr
    assert "wheels/gunicorn-" in result.stdout, "the five largest files are listed"
    assert not list(project.dist_dir.glob("helpdesk-*.tar.gz*"))


@pytest.mark.parametrize("remove, message", [
    ("requirements.txt", "has no requirements.txt"),
    ("wsgi.py", "has no WSGI entry wsgi.py"),
])
def test_an_app_without_its_entry_or_requirements_is_refused(project, remove, message):
    (project.app_dir / remove).unlink()
    result = project.build()
    assert result.returncode != 0
    assert message in result.stderr
    assert len([l for l in result.stderr.splitlines() if l.startswith("error:")]) == 1


def test_requirements_without_gunicorn_are_refused(project):
    (project.app_dir / "requirements.txt").write_text("flask==3.1.3\n")
    result = project.build()
    assert result.returncode != 0 and "does not bring gunicorn" in result.stderr


def test_a_tampered_package_fails_verification(project, tmp_path):
    assert project.build().returncode == 0
    package = project.package()
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(package) as source, tarfile.open(tampered, "w:gz") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name == "wsgi.py":
                data += b"\nimport os\n"
                member.size = len(data)
            import io
            target.addfile(member, io.BytesIO(data))
    with pytest.raises(ToolkitError, match="wsgi.py: sha256 mismatch"):
        verify_package(tampered)


def test_settings_errors_fail_the_build_with_one_line(project):
    result = project.build(PACKAGE_MAX_MB="lots")
    assert result.returncode != 0
    assert "setting PACKAGE_MAX_MB='lots' must be a number of megabytes" in result.stderr


def test_doit_list_shows_every_task_with_a_doc(project):
    listing = project.doit("list").stdout.splitlines()
    assert listing, "doit list printed nothing"
    for line in listing:
        name, _, doc = line.partition(" ")
        assert doc.strip(), f"task {name} has no one-line doc"
    assert {line.split()[0] for line in listing} >= {"build", "sandbox"}


def test_manifest_is_written_sorted_and_stable(project):
    assert project.build().returncode == 0
    with tarfile.open(project.package()) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    paths = [entry["path"] for entry in manifest["files"]]
    assert paths == sorted(paths)


def test_a_build_interrupted_after_writing_leaves_no_partial_package(project):
    # Ctrl-C, or `doit deploy | head` closing the output, once the package is written: dist/
    # keeps no .partial (the pruning of old packages never removes one).
    from scripts.build.package import build_package
    from scripts.settings import load_settings

    def interrupted_at_the_summary(line):
        if line.endswith("largest:"):
            raise KeyboardInterrupt

    settings = load_settings(project.root / "none.env", environ=project.env)
    with pytest.raises(KeyboardInterrupt):
        build_package(settings, log=interrupted_at_the_summary)
    assert project.dist_dir.is_dir()
    assert not list(project.dist_dir.iterdir())
    assert project.build().returncode == 0
    assert [p.name for p in project.dist_dir.glob("*.partial")] == []
