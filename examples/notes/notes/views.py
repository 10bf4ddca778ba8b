from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for

from notes.db import get_db

bp = Blueprint("notes", __name__)


@bp.get("/")
def index():
    notes = get_db().execute("SELECT id, created, body FROM note ORDER BY id DESC").fetchall()
    return render_template("index.html", notes=notes)


@bp.post("/")
def add():
    body = request.form.get("body", "").strip()
    if not body:
        flash("A note needs some text.")
    else:
        db = get_db()
        db.execute("INSERT INTO note (body) VALUES (?)", (body,))
        db.commit()
        current_app.logger.info("note added (%d characters)", len(body))
    return redirect(url_for("notes.index"))
