"""Fixtures of the integration tests: each module that deploys gets its own server, booted
from the provisioned layer, and its own copy of the app."""

from __future__ import annotations

import pytest

from tests.conftest import new_sandbox
from tests.integration.site import Site


@pytest.fixture(scope="module")
def site(tmp_path_factory, provisioned_layer, wheel_cache):
    work = tmp_path_factory.mktemp("site")
    sandbox = new_sandbox(work / "sandbox")
    # Torn down whatever happens: an assertion before the yield must not leave servers up.
    try:
        sandbox.up(1, layer=provisioned_layer)
        yield Site(work, sandbox, wheel_cache)
    finally:
        sandbox.down()
