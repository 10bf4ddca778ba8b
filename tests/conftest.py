"""Shared fixtures. Integration tests run against real Debian 12 servers booted with
systemd-nspawn; the image is built once per machine and every server boots from a copy.
Servers that a test does not provision boot from a saved, provisioned layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.sandbox import Sandbox, root_target
from scripts.settings import REPO_ROOT, load_settings

# A sandbox of its own, so tests never touch the servers of a user's demo.
TEST_SANDBOX_DIR = Path(os.environ.get("TEST_SANDBOX_DIR", REPO_ROOT / ".sandbox-test"))


def new_sandbox(state_dir: Path, suite: str | None = None) -> Sandbox:
    settings = load_settings(env_file=Path("/nonexistent"))
    return Sandbox(state_dir, settings.sandbox_cache, settings.sandbox_mirror,
                   suite=suite or settings.sandbox_suite)


@pytest.fixture(scope="session")
def sandbox():
    """Two bare servers, booted in parallel, shared by the session, torn down at its end."""
    box = new_sandbox(TEST_SANDBOX_DIR)
    # Torn down whatever happens: an assertion before the yield must not leave servers up.
    try:
        box.up(2)
        yield box
    finally:
        box.down()


@pytest.fixture()
def fresh_sandbox(tmp_path):
    """A sandbox of its own for one test; whatever it leaves is torn down afterwards."""
    box = new_sandbox(tmp_path / "sandbox")
    yield box
    box.down()


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory):
    """One wheel cache for the session: wheels are downloaded once, as on a user's machine."""
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="session")
def root_targets(sandbox):
    return [root_target(sandbox, server) for server in sandbox.servers()]


@pytest.fixture(scope="session")
def provisioned_layer(tmp_path_factory):
    """A server provisioned by `doit setup` with the default settings, saved as a layer (cached
    across runs until server_setup.sh or conf/ change), so deploy tests skip provisioning."""
    from scripts.sandbox.layers import ensure_provisioned_layer

    settings = load_settings(env_file=Path("/nonexistent"))
    return ensure_provisioned_layer(settings.sandbox_cache, settings.sandbox_mirror,
                                    tmp_path_factory.mktemp("layer"))
