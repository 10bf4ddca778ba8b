"""WSGI entry point: gunicorn serves `wsgi:app`; `flask --app wsgi migrate` upgrades the schema."""

from helpdesk import create_app

app = create_app()
