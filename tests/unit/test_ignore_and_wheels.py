"""Pure rules: what .deployignore keeps out, and which wheel platforms a server accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.build.ignore import IgnoreRules
from scripts.build.wheels import download_argv, platform_tags


@pytest.fixture()
def rules(tmp_path):
    return IgnoreRules(tmp_path)


@pytest.mark.parametrize("path", [
    ".env", ".env.production", ".git/config", ".venv/bin/python", "venv/lib/x.py",
    "node_modules/a/index.js", "helpdesk/__pycache__/views.cpython-311.pyc", "app.pyc",
    "logs/app.log", "server.log", "tests/test_app.py", "instance/helpdesk.sqlite3",
    "data.db", "db.sqlite3", "uploads/x.png", ".pytest_cache/v", "conftest.py",
    "dist/old.tar.gz", ".deployignore"])
def test_defaults_keep_out_what_never_ships(rules, path):
    assert rules.ignores(path)


@pytest.mark.parametrize("path", [
    "wsgi.py", "requirements.txt", "helpdesk/views.py", "helpdesk/templates/base.html",
    ".env.example", "helpdesk/static/style.css", "environment.py"])
def test_defaults_keep_the_app(rules, path):
    assert not rules.ignores(path)


def test_app_rules_add_to_the_defaults_and_can_negate_them(tmp_path):
    (tmp_path / ".deployignore").write_text("docs/\n/secret.txt\n*.psd\n!keep.log\n")
    rules = IgnoreRules(tmp_path)
    assert rules.ignores("docs/index.md")
    assert rules.ignores("secret.txt")
    assert not rules.ignores("sub/secret.txt"), "a leading / anchors to APP_DIR"
    assert rules.ignores("art/logo.psd")
    assert not rules.ignores("keep.log")
    assert rules.ignores("other.log")


def test_a_file_inside_an_ignored_folder_stays_out_even_if_negated(tmp_path):
    (tmp_path / ".deployignore").write_text("!node_modules/keep.js\n")
    assert IgnoreRules(tmp_path).ignores("node_modules/keep.js")


@pytest.mark.parametrize("pattern, ignored, kept", [
    # `**` spans any number of folders, none included
    ("**/secrets", ["secrets", "a/secrets", "a/b/secrets/key.pem"], ["secretsx", "a/secrets.py"]),
    ("docs/**/*.md", ["docs/a.md", "docs/x/y/b.md"], ["a.md", "other/docs/a.md", "docs/a.txt"]),
    ("assets/**/raw", ["assets/raw/x.png", "assets/a/b/raw/x.png"], ["raw/x.png"]),
    ("scratch/**", ["scratch/a", "scratch/b/c.py"], ["scratch.py"]),
    # a `/` at the start or in the middle anchors to APP_DIR; none matches at any depth
    ("/local.cfg", ["local.cfg"], ["app/local.cfg"]),
    ("config/dev.cfg", ["config/dev.cfg"], ["app/config/dev.cfg"]),
    ("*.bak", ["x.bak", "a/b/x.bak"], ["x.bak.py"]),
    # `*` and `?` do not cross a `/`
    ("notes/*.txt", ["notes/a.txt"], ["notes/sub/a.txt"]),
    # a trailing `/` matches folders only
    ("media/", ["media/logo.png", "app/media/x"], ["media"]),
])
def test_deployignore_has_gitignore_semantics(tmp_path, pattern, ignored, kept):
    (tmp_path / ".deployignore").write_text(pattern + "\n")
    rules = IgnoreRules(tmp_path)
    assert [path for path in ignored if not rules.ignores(path)] == []
    assert [path for path in kept if rules.ignores(path)] == []


def test_negation_re_includes_and_the_last_matching_rule_wins(tmp_path):
    (tmp_path / ".deployignore").write_text("data/*\n!data/seed.json\n*.json\n!/config.json\n")
    rules = IgnoreRules(tmp_path)
    assert rules.ignores("data/dump.csv")
    assert rules.ignores("data/seed.json"), "*.json comes after the negation and wins"
    assert not rules.ignores("config.json")
    assert rules.ignores("sub/config.json"), "the negation is anchored"


def test_a_negated_default_ships_again(tmp_path):
    (tmp_path / ".deployignore").write_text("!tests/\n")
    assert not IgnoreRules(tmp_path).ignores("tests/test_app.py")


def test_manylinux_tag_expands_to_older_glibc_levels():
    tags = platform_tags("manylinux_2_36_x86_64")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags
    assert platform_tags("linux_aarch64") == ["linux_aarch64"]


def test_wheel_download_is_binary_only_for_the_target_python(tmp_path):
    argv = download_argv(Path("requirements.txt"), tmp_path, "3.11", "manylinux_2_36_x86_64")
    assert argv[1:4] == ["-m", "pip", "download"]
    assert "--only-binary=:all:" in argv
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert argv[argv.index("--abi") + 1] == "cp311"
    assert argv[argv.index("-d") + 1] == str(tmp_path)
