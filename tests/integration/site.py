"""A deployable site for integration tests: a sandbox server booted from the provisioned layer
and a private copy of the helpdesk app that tests may change, deployed with real doit."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import requests

from scripts.remote import Target, connect
from scripts.sandbox import Sandbox
from scripts.settings import REPO_ROOT
from tests.build.conftest import copy_app
from tests.integration.helpers import DOIT, doit, doit_env


class Site:
    def __init__(self, work: Path, sandbox: Sandbox, wheel_cache: Path, app: str = "helpdesk"):
        self.work = work
        self.sandbox = sandbox
        self.app_dir = copy_app(work / app, REPO_ROOT / "examples" / app)
        self.settings = {"APP_DIR": str(self.app_dir), "DIST_DIR": str(work / "dist"),
                         "WHEEL_CACHE": str(wheel_cache)}

    @property
    def server(self):
        return self.sandbox.servers()[0]

    @property
    def url(self) -> str:
        return self.server.url

    def doit(self, *args: str, **settings: str) -> subprocess.CompletedProcess:
        return doit(self.work, self.sandbox.state_dir, *args, **{**self.settings, **settings})

    def start_doit(self, *args: str, **settings: str) -> subprocess.Popen:
        """A doit run in the background, its output merged, line by line."""
        env = doit_env(self.sandbox.state_dir, **{**self.settings, **settings})
        return subprocess.Popen([*DOIT, "--dir", str(self.work), *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def as_remote_server(self, **settings: str) -> dict:
        """Settings that reach this sandbox server as a user's real server would be reached:
        by address, port, key and known_hosts, not through the sandbox shortcut."""
        return {"DEPLOY_SERVER": "127.0.0.1", "SSH_PORT": str(self.server.ssh_port),
                "SSH_KEY_FILE": str(self.sandbox.deploy_key_file),
                "SSH_KNOWN_HOSTS_FILE": str(self.sandbox.known_hosts_file), **settings}

    def deploy(self, **settings: str) -> subprocess.CompletedProcess:
        """What CI does per stage: build, ship, verify (provisioning came from the layer)."""
        for task in ("build", "ship", "verify"):
            result = self.doit("-s", task, **settings)
            if result.returncode != 0:
                return result
        return result

    def ship(self, **settings: str) -> subprocess.CompletedProcess:
        """Build, then `doit -s ship`: the ship's result (the build must succeed)."""
        assert self.doit("-s", "build", **settings).returncode == 0
        return self.doit("-s", "ship", **settings)

    def built_release(self) -> str:
        return json.loads((self.work / "dist" / f"{self.app_dir.name}.json").read_text())[
            "release_id"]

    def served_release(self) -> str:
        return requests.get(self.url + "healthz", timeout=10).json()["release"]

    def change_code(self, marker: str) -> None:
        views = self.app_dir / "helpdesk" / "views.py"
        views.write_text(views.read_text() + f"\n# {marker}\n")

    @contextmanager
    def edited(self, relative: str, edit):
        """The app's file `relative` as `edit(old text)` makes it, for the duration only."""
        target = self.app_dir / relative
        good = target.read_text()
        target.write_text(edit(good))
        try:
            yield
        finally:
            target.write_text(good)

    def admin(self):
        return connect(Target(self.server.host, self.server.ssh_port, "admin",
                              self.sandbox.key_file, self.sandbox.known_hosts_file))

    def deploy_user(self):
        return connect(Target(self.server.host, self.server.ssh_port, "deploy",
                              self.sandbox.deploy_key_file, self.sandbox.known_hosts_file))

    def create_ticket(self, title: str) -> int:
        response = requests.post(self.url + "api/tickets", json={"title": title}, timeout=10)
        response.raise_for_status()
        return response.json()["id"]

    def ticket_titles(self) -> list[str]:
        return [t["title"] for t in requests.get(self.url + "api/tickets", timeout=10).json()]
