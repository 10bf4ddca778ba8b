"""The bundled helpdesk, through Flask's test client."""

import json

from helpdesk.db import MIGRATIONS, migrate


def create(client, title="Printer on fire", body="Third floor"):
    return client.post("/tickets/new", data={"title": title, "body": body})


def test_create_list_and_view_a_ticket(client):
    response = create(client)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.endswith("/tickets/1")
    assert b"Printer on fire" in client.get("/").data
    page = client.get(location).data
    assert b"Third floor" in page and b"open" in page


def test_a_ticket_needs_a_title(client):
    assert create(client, title="  ").status_code == 400
    assert client.get("/api/tickets").get_json() == []


def test_change_status_and_filter_by_it(client):
    create(client, "one")
    create(client, "two")
    assert client.post("/tickets/2/status", data={"status": "resolved"}).status_code == 302
    assert client.post("/tickets/2/status", data={"status": "bogus"}).status_code == 400
    resolved = client.get("/?status=resolved").data
    assert b"two" in resolved and b">one<" not in resolved


def test_comments(client):
    create(client)
    client.post("/tickets/1/comments", data={"author": "Olga", "body": "Replaced the toner"})
    assert client.post("/tickets/1/comments", data={"body": ""}).status_code == 400
    ticket = client.get("/api/tickets/1").get_json()
    assert [(c["author"], c["body"]) for c in ticket["comments"]] == [("Olga", "Replaced the toner")]


def test_json_api(client):
    response = client.post("/api/tickets", json={"title": "VPN down"})
    assert response.status_code == 201
    assert response.get_json()["status"] == "open"
    assert client.post("/api/tickets", json={}).status_code == 400
    assert [t["title"] for t in client.get("/api/tickets").get_json()] == ["VPN down"]
    assert client.get("/api/tickets/99").status_code == 404


def test_healthz_reports_release_and_database(client):
    health = client.get("/healthz").get_json()
    assert health == {"status": "ok", "release": "test-release", "database": "ok",
                      "schema_version": len(MIGRATIONS)}


def test_healthz_fails_when_the_database_is_broken(app, tmp_path):
    broken = tmp_path / "broken.sqlite3"
    broken.write_text("this is not a database")
    app.config["DATABASE"] = str(broken)
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["status"] == "error"


def test_migrate_is_safe_to_run_twice(tmp_path):
    path = str(tmp_path / "fresh.sqlite3")
    assert migrate(path) == (0, len(MIGRATIONS))
    assert migrate(path) == (len(MIGRATIONS), len(MIGRATIONS))


def test_migrate_command(app):
    runner = app.test_cli_runner()
    assert "ok: schema is up to date" in runner.invoke(args=["migrate"]).output


def test_release_id_comes_from_the_manifest(tmp_path, monkeypatch):
    import helpdesk
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"release_id": "abc123"}))
    monkeypatch.setattr(helpdesk, "__file__", str(tmp_path / "helpdesk" / "__init__.py"))
    monkeypatch.delenv("RELEASE_ID", raising=False)
    assert helpdesk._release_from_manifest() == "abc123"


def test_logs_go_to_files_when_a_log_dir_is_set(tmp_path):
    from helpdesk import create_app
    app = create_app({"DATABASE": str(tmp_path / "db.sqlite3"), "LOG_DIR": str(tmp_path)})
    migrate(app.config["DATABASE"])
    app.test_client().post("/api/tickets", json={"title": "logged"})
    app.logger.error("something broke")
    for handler in app.logger.handlers:
        handler.flush()
    assert "ticket 1 created" in (tmp_path / "app.log").read_text()
    assert "something broke" in (tmp_path / "error.log").read_text()
    assert "ticket 1 created" not in (tmp_path / "error.log").read_text()
