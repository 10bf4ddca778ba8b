"""Notes: a small Flask app written the way Flask's tutorial writes apps (an application factory,
SQLite in the instance folder, a `flask init-db` command), with a plain-text /ping for health
checks and logging to stderr. The deploy toolkit's second example, to prove it takes apps that
were not written for it."""

import logging
import os

from flask import Flask


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev"),
        DATABASE=os.path.join(app.instance_path, "notes.sqlite"),
    )
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
    else:
        app.config.from_mapping(test_config)

    os.makedirs(app.instance_path, exist_ok=True)
    # stderr only: under gunicorn and systemd that is the journal.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    @app.get("/ping")
    def ping():
        return "pong\n", 200, {"Content-Type": "text/plain; charset=utf-8"}

    from . import db, views

    db.init_app(app)
    app.register_blueprint(views.bp)
    return app
