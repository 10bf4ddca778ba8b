import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from notes import create_app  # noqa: E402
from notes.db import init_db  # noqa: E402


@pytest.fixture()
def app(tmp_path):
    app = create_app({"TESTING": True, "DATABASE": str(tmp_path / "notes.sqlite")})
    with app.app_context():
        init_db()
    return app


@pytest.fixture()
def client(app):
    return app.test_client()
