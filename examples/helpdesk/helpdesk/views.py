"""Pages and a small JSON API: list, create and view tickets, change their status, comment."""

from __future__ import annotations

import sqlite3

from flask import (Blueprint, abort, current_app, flash, jsonify, redirect, render_template,
                   request, url_for)

from helpdesk.db import STATUSES, get_db, schema_version

bp = Blueprint("helpdesk", __name__)


def _ticket_or_404(ticket_id: int) -> sqlite3.Row:
    ticket = get_db().execute("SELECT * FROM tickets WHERE id = ?", (ticket_id,)).fetchone()
    if ticket is None:
        abort(404)
    return ticket


def _comments(ticket_id: int) -> list[sqlite3.Row]:
    return get_db().execute("SELECT * FROM comments WHERE ticket_id = ? ORDER BY id",
                            (ticket_id,)).fetchall()


def _create_ticket(title: str, body: str) -> int:
    connection = get_db()
    with connection:
        cursor = connection.execute("INSERT INTO tickets (title, body) VALUES (?, ?)",
                                    (title, body))
    current_app.logger.info("ticket %s created", cursor.lastrowid)
    return cursor.lastrowid


def _set_status(ticket_id: int, status: str) -> None:
    connection = get_db()
    with connection:
        connection.execute("UPDATE tickets SET status = ? WHERE id = ?", (status, ticket_id))
    current_app.logger.info("ticket %s status %s", ticket_id, status)


def _add_comment(ticket_id: int, author: str, body: str) -> None:
    connection = get_db()
    with connection:
        connection.execute("INSERT INTO comments (ticket_id, author, body) VALUES (?, ?, ?)",
                           (ticket_id, author or "staff", body))


# -- pages --------------------------------------------------------------------------------------
@bp.get("/")
def index():
    status = request.args.get("status")
    query, params = "SELECT * FROM tickets ORDER BY id DESC", ()
    if status in STATUSES:
        query, params = "SELECT * FROM tickets WHERE status = ? ORDER BY id DESC", (status,)
    tickets = get_db().execute(query, params).fetchall()
    return render_template("index.html", tickets=tickets, statuses=STATUSES, status=status)


@bp.route("/tickets/new", methods=["GET", "POST"])
def new_ticket():
    if request.method == "POST":
        title = request.form.get("title", "").strip()
        if not title:
            flash("A ticket needs a title.")
            return render_template("new.html"), 400
        ticket_id = _create_ticket(title, request.form.get("body", "").strip())
        return redirect(url_for("helpdesk.view_ticket", ticket_id=ticket_id))
    return render_template("new.html")


@bp.get("/tickets/<int:ticket_id>")
def view_ticket(ticket_id: int):
    return render_template("ticket.html", ticket=_ticket_or_404(ticket_id),
                           comments=_comments(ticket_id), statuses=STATUSES)


@bp.post("/tickets/<int:ticket_id>/status")
def change_status(ticket_id: int):
    _ticket_or_404(ticket_id)
    status = request.form.get("status", "")
    if status not in STATUSES:
        abort(400)
    _set_status(ticket_id, status)
    return redirect(url_for("helpdesk.view_ticket", ticket_id=ticket_id))


@bp.post("/tickets/<int:ticket_id>/comments")
def add_comment(ticket_id: int):
    _ticket_or_404(ticket_id)
    body = request.form.get("body", "").strip()
    if not body:
        abort(400)
    _add_comment(ticket_id, request.form.get("author", "").strip(), body)
    return redirect(url_for("helpdesk.view_ticket", ticket_id=ticket_id))


# -- JSON API -------------------------------------------------------------------------------------
def _ticket_json(ticket: sqlite3.Row) -> dict:
    return {key: ticket[key] for key in ticket.keys()}


@bp.get("/api/tickets")
def api_list():
    tickets = get_db().execute("SELECT * FROM tickets ORDER BY id").fetchall()
    return jsonify([_ticket_json(t) for t in tickets])


@bp.post("/api/tickets")
def api_create():
    data = request.get_json(silent=True) or {}
    title = str(data.get("title", "")).strip()
    if not title:
        return jsonify(error="title is required"), 400
    ticket_id = _create_ticket(title, str(data.get("body", "")).strip())
    return jsonify(_ticket_json(_ticket_or_404(ticket_id))), 201


@bp.get("/api/tickets/<int:ticket_id>")
def api_get(ticket_id: int):
    ticket = _ticket_json(_ticket_or_404(ticket_id))
    ticket["comments"] = [_ticket_json(c) for c in _comments(ticket_id)]
    return jsonify(ticket)


@bp.get("/healthz")
def healthz():
    """Liveness for the deploy toolkit: the release id it runs and whether the database answers."""
    release = current_app.config["RELEASE_ID"]
    try:
        version = schema_version(get_db())
        get_db().execute("SELECT count(*) FROM tickets").fetchone()
    except sqlite3.Error as error:
        return jsonify(status="error", release=release, database=f"error: {error}"), 503
    return jsonify(status="ok", release=release, database="ok", schema_version=version)
