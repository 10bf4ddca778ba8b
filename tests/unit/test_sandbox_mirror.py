"""The sandbox's Debian mirror comes from this machine's own apt sources or SANDBOX_MIRROR.
Host names here are placeholders under the reserved .test and .example domains."""

from __future__ import annotations

import pytest

from scripts.errors import ToolkitError
from scripts.sandbox.mirror import (DebianMirror, parse_deb822_sources, parse_one_line_sources,
                                    resolve_mirror)

DEB822 = """\
Types: deb
# a snapshot, commented out
URIs: http://mirror.test/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.test/debian-security
Suites: bookworm-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 -----END PGP PUBLIC KEY BLOCK-----
"""

VENDOR = """\
Types: deb
URIs: https://vendor.example/node_20.x
Suites: nodistro
Components: main
"""


def apt_dir(tmp_path, sources_list="", parts=None):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(sources_list)
    for name, text in (parts or {}).items():
        (tmp_path / "sources.list.d" / name).write_text(text)
    return tmp_path


def test_one_line_sources_skip_deb_src_comments_and_options():
    sources = parse_one_line_sources(
        "# deb http://old.test/debian buster main\n"
        "deb-src http://src.test/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.test/debian bookworm main contrib\n")
    assert [(s.uri, s.suites, s.components) for s in sources] == [
        ("http://mirror.test/debian", ("bookworm",), ("main", "contrib"))]


def test_deb822_stanzas_with_comments_continuations_and_several_suites():
    sources = parse_deb822_sources(DEB822)
    assert [(s.uri, s.suites) for s in sources] == [
        ("http://mirror.test/debian", ("bookworm", "bookworm-updates")),
        ("http://mirror.test/debian-security", ("bookworm-security",))]


def test_deb822_disabled_stanzas_and_source_only_types_are_skipped():
    text = ("Types: deb\nURIs: http://off.test/debian\nSuites: bookworm\nComponents: main\n"
            "Enabled: no\n\nTypes: deb-src\nURIs: http://src.test/debian\nSuites: bookworm\n"
            "Components: main\n")
    assert parse_deb822_sources(text) == []


def test_the_machines_deb822_sources_give_the_mirror_and_its_security_archive(tmp_path):
    folder = apt_dir(tmp_path, parts={"debian.sources": DEB822, "vendor.sources": VENDOR})
    mirror = resolve_mirror("", folder)
    assert mirror == DebianMirror("http://mirror.test/debian", "http://mirror.test/debian-security")
    assert (mirror.host, mirror.port) == ("mirror.test", 80)
    assert mirror.sources_list("trixie").splitlines() == [
        "deb http://mirror.test/debian trixie main",
        "deb http://mirror.test/debian trixie-updates main",
        "deb http://mirror.test/debian-security trixie-security main"]


def test_a_caching_proxy_in_sources_list_keeps_its_port(tmp_path):
    folder = apt_dir(tmp_path, "deb http://cache.test:3142/debian/ bookworm main\n")
    mirror = resolve_mirror("", folder)
    assert (mirror.archive, mirror.host, mirror.port) == ("http://cache.test:3142/debian",
                                                          "cache.test", 3142)
    assert "security" not in mirror.sources_list("bookworm")


def test_other_vendors_and_https_archives_are_not_taken_for_debian(tmp_path):
    folder = apt_dir(tmp_path,
                     "deb https://tls.test/debian bookworm main\n"
                     "deb http://vendor.example/apt cloud-sdk-bookworm main\n",
                     {"debian.list": "deb http://plain.test/debian bookworm main\n"})
    assert resolve_mirror("", folder).archive == "http://plain.test/debian"


def test_a_security_archive_on_another_host_is_left_out(tmp_path):
    folder = apt_dir(tmp_path, "deb http://mirror.test/debian bookworm main\n"
                               "deb http://security.test/debian-security bookworm-security main\n")
    assert resolve_mirror("", folder) == DebianMirror("http://mirror.test/debian", "")


def test_the_setting_wins_over_the_apt_sources(tmp_path):
    folder = apt_dir(tmp_path, parts={"debian.sources": DEB822})
    assert resolve_mirror("http://own.test/debian/", folder) == DebianMirror(
        "http://own.test/debian", "")
    # On the same host as the apt sources' security archive, that one is used too.
    assert resolve_mirror("http://mirror.test/debian", folder).security == \
        "http://mirror.test/debian-security"


def test_no_debian_mirror_anywhere_is_one_line_naming_the_setting(tmp_path):
    folder = apt_dir(tmp_path, parts={"vendor.sources": VENDOR})
    with pytest.raises(ToolkitError, match=r"no plain http:// Debian mirror .* \(found only "
                                           r"https://vendor.example/node_20.x\); set SANDBOX_MIRROR"):
        resolve_mirror("", folder)


def test_an_https_setting_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match=r"SANDBOX_MIRROR='https://own.test/debian' must be a "
                                           r"plain http://"):
        resolve_mirror("https://own.test/debian", apt_dir(tmp_path))
