from notes.db import init_db


def test_ping_is_plain_text(client):
    response = client.get("/ping")
    assert response.status_code == 200
    assert response.mimetype == "text/plain" and response.text == "pong\n"


def test_a_note_is_added_and_listed(client):
    response = client.post("/", data={"body": "buy milk"}, follow_redirects=True)
    assert "buy milk" in response.text


def test_an_empty_note_is_refused(client):
    assert "needs some text" in client.post("/", data={"body": " "}, follow_redirects=True).text


def test_init_db_again_keeps_the_notes(app, client):
    client.post("/", data={"body": "kept"})
    with app.app_context():
        init_db()
    assert "kept" in client.get("/").text


def test_init_db_command(app):
    with app.app_context():  # `flask --app notes init-db` gives it one
        assert "Initialized" in app.test_cli_runner().invoke(args=["init-db"]).output
