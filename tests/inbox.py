"""A loopback HTTP endpoint that records JSON POSTs, standing in for a chat webhook or the
Telegram API; it can be told to answer an error or to hang."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


class Inbox:
    def __init__(self):
        self.messages: list[tuple[str, dict]] = []
        self.status = 200
        self.delay = 0.0
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(inbox.delay)
                inbox.messages.append((self.path, body))
                self.send_response(inbox.status)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def reset(self) -> None:
        self.messages, self.status, self.delay = [], 200, 0.0

    def texts(self, path: str) -> list[str]:
        return [body["text"] for got, body in self.messages if got == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
