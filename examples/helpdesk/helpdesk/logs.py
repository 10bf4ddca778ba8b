"""When APP_LOG_DIR is set (as it is on a server), write app.log and error.log there.

WatchedFileHandler reopens a file that logrotate moved away, so rotation needs no restart."""

from __future__ import annotations

import logging
from logging.handlers import WatchedFileHandler
from pathlib import Path

from flask import Flask

FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def configure(app: Flask) -> None:
    app.logger.setLevel(logging.INFO)
    log_dir = app.config.get("LOG_DIR")
    if not log_dir:
        return
    for file_name, level in (("app.log", logging.INFO), ("error.log", logging.ERROR)):
        handler = WatchedFileHandler(Path(log_dir) / file_name)
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(FORMAT))
        app.logger.addHandler(handler)
