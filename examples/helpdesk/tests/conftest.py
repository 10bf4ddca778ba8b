import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpdesk import create_app  # noqa: E402


@pytest.fixture()
def app(tmp_path):
    app = create_app({"DATABASE": str(tmp_path / "test.sqlite3"), "TESTING": True,
                      "RELEASE_ID": "test-release"})
    from helpdesk.db import migrate
    migrate(app.config["DATABASE"])
    return app


@pytest.fixture()
def client(app):
    return app.test_client()
