"""A small, bounded load generator for zero-downtime proofs: steady GETs (or, with `writes`,
POSTs of unique content) at a fixed rate from a few threads, stopping by itself after
max_requests or max_seconds. Loopback targets only."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import requests

LOOPBACK_PREFIXES = ("127.", "localhost", "[::1]", "::1")


@dataclass
class LoadReport:
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    releases: Counter = field(default_factory=Counter)
    worst_latency_s: float = 0.0
    switches: int = 0  # how often consecutive answers came from a different release
    seconds: float = 0.0
    acknowledged: list[str] = field(default_factory=list)  # writes answered 201, in order


class Load:
    def __init__(self, url: str, rate_per_s: float = 40, threads: int = 4,
                 max_requests: int = 20000, max_seconds: float = 600, timeout_s: float = 30,
                 writes: str = "", make_session=requests.Session):
        """With `writes` (a prefix), each request POSTs {"title": "<prefix> <n>"} to url and
        expects 201; the titles acknowledged are kept in report.acknowledged. make_session
        gives each thread its session (HTTPS tests trust a test CA and name the host there)."""
        host = urlparse(url).hostname or ""
        if not host.startswith(LOOPBACK_PREFIXES):
            raise ValueError(f"load is only ever sent to loopback addresses, not {host}")
        self.url = url
        self.interval = threads / rate_per_s
        self.threads = threads
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.timeout = timeout_s
        self.writes = writes
        self.make_session = make_session
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._last_release = None
        self._started = 0.0

    def __enter__(self) -> "Load":
        self._started = time.monotonic()
        self._workers = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.timeout + 5)
        self.report.seconds = time.monotonic() - self._started

    def _run(self) -> None:
        session = self.make_session()
        deadline = self._started + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self.report.sent >= self.max_requests:
                    return
                self.report.sent += 1
                number = self.report.sent
            began = time.monotonic()
            outcome, release = self._write(session, number) if self.writes else \
                self._one(session)
            latency = time.monotonic() - began
            with self._lock:
                self.report.worst_latency_s = max(self.report.worst_latency_s, latency)
                if outcome:
                    self.report.failures.append(f"{time.monotonic() - self._started:.2f}s "
                                                f"{outcome}")
                else:
                    self.report.releases[release] += 1
                    if self._last_release not in (None, release):
                        self.report.switches += 1
                    self._last_release = release
            self._stop.wait(max(0.0, self.interval - latency))

    def _write(self, session: requests.Session, number: int) -> tuple[str, str | None]:
        title = f"{self.writes} {number}"
        try:
            response = session.post(self.url, json={"title": title}, timeout=self.timeout)
        except requests.RequestException as error:
            return f"{title}: {type(error).__name__}", None
        if response.status_code != 201:
            return f"{title}: HTTP {response.status_code}", None
        with self._lock:
            self.report.acknowledged.append(title)
        return "", None

    def _one(self, session: requests.Session) -> tuple[str, str | None]:
        try:
            response = session.get(self.url, timeout=self.timeout)
        except requests.RequestException as error:
            return f"{type(error).__name__}", None
        if not response.ok:
            return f"HTTP {response.status_code}", None
        try:
            return "", response.json().get("release")
        except ValueError:
            return "", None
