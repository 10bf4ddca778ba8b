"""SQLite access and schema migrations (PRAGMA user_version counts the migrations applied)."""

from __future__ import annotations

import sqlite3

import click
from flask import Flask, current_app, g
from flask.cli import with_appcontext

# Append only: a deployed database has run every migration up to its user_version.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tickets (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        body TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'open',
        created_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    """,
    """
    CREATE TABLE comments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ticket_id INTEGER NOT NULL REFERENCES tickets(id) ON DELETE CASCADE,
        author TEXT NOT NULL DEFAULT 'staff',
        body TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE INDEX comments_by_ticket ON comments(ticket_id);
    """,
)
STATUSES = ("open", "in_progress", "resolved", "closed")


def connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=10)
    connection.row_factory = sqlite3.Row
    # WAL lets gunicorn workers read while another writes; old and new releases share the file.
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


def get_db() -> sqlite3.Connection:
    if "db" not in g:
        g.db = connect(current_app.config["DATABASE"])
    return g.db


def close_db(_error=None) -> None:
    connection = g.pop("db", None)
    if connection is not None:
        connection.close()


def schema_version(connection: sqlite3.Connection) -> int:
    return connection.execute("PRAGMA user_version").fetchone()[0]


def migrate(path: str) -> tuple[int, int]:
    """Apply the migrations not yet applied; returns (version before, version after)."""
    connection = connect(path)
    try:
        before = schema_version(connection)
        for number, script in enumerate(MIGRATIONS[before:], start=before + 1):
            with connection:
                connection.executescript(f"BEGIN; {script} PRAGMA user_version = {number}; COMMIT;")
        return before, schema_version(connection)
    finally:
        connection.close()


@click.command("migrate")
@with_appcontext
def migrate_command() -> None:
    """Bring the database schema up to date (safe to run again)."""
    before, after = migrate(current_app.config["DATABASE"])
    if before == after:
        click.echo(f"ok: schema is up to date (version {after})")
    else:
        click.echo(f"changed: schema migrated from version {before} to {after}")


def init_app(app: Flask) -> None:
    app.teardown_appcontext(close_db)
    app.cli.add_command(migrate_command)
