"""The sandbox says clearly what the host lacks, before it touches anything."""

from __future__ import annotations

import pytest

from scripts.errors import ToolkitError
from scripts.sandbox import servers


def test_not_root_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(servers.os, "geteuid", lambda: 1000)
    with pytest.raises(ToolkitError, match=r"needs root .* run it as root"):
        servers.check_host_ready()


@pytest.mark.parametrize("tool, package", [("systemd-nspawn", "systemd-container"),
                                           ("debootstrap", "debootstrap"), ("socat", "socat")])
def test_missing_tool_names_the_package_to_install(monkeypatch, tool, package):
    monkeypatch.setattr(servers.os, "geteuid", lambda: 0)
    real_which = servers.shutil.which
    monkeypatch.setattr(servers.shutil, "which",
                        lambda name: None if name == tool else real_which(name) or "/bin/x")
    with pytest.raises(ToolkitError, match=f"`{tool}` is not installed; install it with "
                                           f"`apt-get install {package}`"):
        servers.check_host_ready()


def test_image_name_changes_with_the_recipe():
    from scripts.sandbox import image
    from scripts.sandbox.mirror import DebianMirror
    a, b = DebianMirror("http://a/debian"), DebianMirror("http://b/debian")
    assert image.image_name(a) != image.image_name(b)
    assert image.image_name(a) == image.image_name(DebianMirror("http://a/debian"))
    assert image.image_name(a, "trixie") != image.image_name(a, "bookworm")
    assert image.image_name(a, "trixie").startswith("debian-trixie-")


def test_an_unknown_suite_is_one_clear_error(tmp_path):
    with pytest.raises(ToolkitError, match=r"SANDBOX_SUITE='jessie' .* bookworm, trixie"):
        servers.Sandbox(tmp_path, tmp_path, suite="jessie")
