"""Flask Helpdesk: tickets with a status and comments, stored in SQLite in the instance folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask import Flask

from helpdesk import db, logs, views

DEFAULT_RELEASE = "dev"


def create_app(config: dict | None = None) -> Flask:
    instance_path = os.environ.get("HELPDESK_INSTANCE_PATH")
    app = Flask(__name__, instance_path=instance_path or None, instance_relative_config=True)
    app.config.from_mapping(
        SECRET_KEY=os.environ.get("HELPDESK_SECRET_KEY", "dev-only-secret"),
        DATABASE=str(Path(app.instance_path) / "helpdesk.sqlite3"),
        RELEASE_ID=os.environ.get("RELEASE_ID") or _release_from_manifest(),
        LOG_DIR=os.environ.get("APP_LOG_DIR", ""),
    )
    if config:
        app.config.update(config)
    Path(app.config["DATABASE"]).parent.mkdir(parents=True, exist_ok=True)
    logs.configure(app)
    db.init_app(app)
    app.register_blueprint(views.bp)
    return app


def _release_from_manifest() -> str:
    """A deployed release carries manifest.json (written by the deploy toolkit's build)."""
    manifest = Path(__file__).resolve().parent.parent / "manifest.json"
    try:
        return json.loads(manifest.read_text())["release_id"]
    except (OSError, ValueError, KeyError):
        return DEFAULT_RELEASE
