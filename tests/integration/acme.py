"""A real ACME server for HTTPS tests: Debian's pebble and pebble-challtestsrv (its DNS) on this
machine's loopback, reached from a sandbox server the way its apt reaches the mirror (a socat
bridge listening on the server's own loopback). Pebble validates HTTP-01 for real: its DNS
points every name at 127.0.0.1 and its `httpPort` is the server's forwarded port 80, so the
challenge travels to the server's nginx. Every process started here is ended by its PID."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from scripts.sandbox import processes
from scripts.sandbox.servers import SandboxServer

# Where certbot on the server finds pebble: a port on the server's own loopback.
PORT_IN_SERVER = 14000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Pebble:
    def __init__(self, work: Path, server: SandboxServer):
        self.work = work
        self.server = server
        self.port, self.management_port = free_port(), free_port()
        self.dns_port, self.dns_management_port = free_port(), free_port()
        self.https_port = free_port()  # this machine's port forwarded to the server's 443
        self.listener_ca = work / "pebble-listener.pem"  # ACME_CA_BUNDLE: pebble's own TLS
        self.issuing_root = work / "pebble-root.pem"     # what a client of the site trusts
        self.log_file = work / "pebble.log"
        self.started: list[tuple[int, str]] = []  # (pid, marker) of every process started here

    @property
    def acme_server(self) -> str:
        """ACME_SERVER as certbot on the server sees it."""
        return f"https://127.0.0.1:{PORT_IN_SERVER}/dir"

    def _spawn(self, argv: list[str], marker: str, env: dict | None = None) -> None:
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True, close_fds=True,
                                       env={**os.environ, **(env or {})})
        self.started.append((process.pid, marker))

    def start(self) -> "Pebble":
        key = self.work / "pebble-listener.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=pebble", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(self.listener_ca)],
                       check=True, capture_output=True)
        config = self.work / "pebble-config.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.listener_ca), "privateKey": str(key),
            "httpPort": self.server.http_port,  # HTTP-01 goes to the server's nginx
            "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}))
        dns = f"127.0.0.1:{self.dns_port}"
        self._spawn(["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                     "-dns01", dns, "-http01", "", "-https01", "", "-tlsalpn01", "",
                     "-management", f"127.0.0.1:{self.dns_management_port}"], "-dns01")
        # NOSLEEP: no random wait before validating; NONCEREJECT=0: no deliberately bad nonces.
        self._spawn(["pebble", "-config", str(config), "-dnsserver", dns], str(config),
                    {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"})
        self._bridge()
        self._wait_ready()
        root = requests.get(f"https://127.0.0.1:{self.management_port}/roots/0",
                            verify=str(self.listener_ca), timeout=10)
        root.raise_for_status()
        self.issuing_root.write_text(root.text)
        return self

    def _bridge(self) -> None:
        """certbot on the server -> 127.0.0.1:PORT_IN_SERVER there -> pebble here; and this
        machine's https_port -> the server's nginx on 443."""
        server = self.server
        listen = f"TCP-LISTEN:{PORT_IN_SERVER},bind=127.0.0.1"
        self._spawn(["nsenter", "-t", str(server.init_pid), "-n", "socat",
                     f"{listen},fork,reuseaddr",
                     f"EXEC:nsenter --net=/proc/{server.nspawn_pid}/ns/net socat STDIO "
                     f"TCP\\:127.0.0.1\\:{self.port}"], listen)
        listen = f"TCP-LISTEN:{self.https_port},bind=127.0.0.1"
        self._spawn(["socat", f"{listen},fork,reuseaddr",
                     f"EXEC:nsenter -t {server.init_pid} -n socat STDIO TCP\\:127.0.0.1\\:443"],
                    listen)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"https://127.0.0.1:{self.port}/dir", verify=str(self.listener_ca),
                             timeout=2).raise_for_status()
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pebble did not start: {self.log_file.read_text()}")
                time.sleep(0.2)

    def point(self, name: str, address: str) -> None:
        """Make pebble's DNS answer `address` for `name` (a name not pointing at the server)."""
        requests.post(f"http://127.0.0.1:{self.dns_management_port}/add-a", timeout=5,
                      json={"host": name.rstrip(".") + ".", "addresses": [address]}
                      ).raise_for_status()

    def stop(self) -> None:
        for pid, marker in reversed(self.started):
            processes.end_group(pid, marker)
        self.started.clear()

    # -- a client of the site over HTTPS, through the forwarded port ---------------------------
    def session(self, name: str) -> requests.Session:
        """A session to https://127.0.0.1:<https_port>/ that sends SNI and Host `name` and
        trusts pebble's issuing root only (the certificate must name `name`)."""
        session = requests.Session()
        session.mount("https://", _NamedHost(name, self.issuing_root))
        session.headers["Host"] = name
        return session

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/"

    def curl(self, name: str, path: str, *args: str) -> subprocess.CompletedProcess:
        """curl over HTTPS through the forwarded port, trusting pebble's root, as `name`."""
        return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert",
                               str(self.issuing_root), "--resolve",
                               f"{name}:{self.https_port}:127.0.0.1", *args,
                               f"https://{name}:{self.https_port}{path}"],
                              capture_output=True, text=True)


class _NamedHost(HTTPAdapter):
    """TLS to an address with another name for SNI and the certificate check, trusting the
    CA file only (its own SSL context: requests' `verify` path does not reach this pool)."""

    def __init__(self, name: str, cafile: Path):
        self.name = name
        self.context = ssl.create_default_context(cafile=str(cafile))
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["server_hostname"] = self.name
        kwargs["ssl_context"] = self.context
        super().init_poolmanager(*args, **kwargs)
