"""Deployment toolkit for Flask apps: doit tasks that drive plumbum over SSH."""

TOOL_NAME = "flask-deploy"
TOOL_VERSION = "0.1.0"
