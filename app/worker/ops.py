"""A worker's operations endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``, on one port.

It runs in a thread of its own from the worker's first moments, so it answers while
models load and even if the event loop is stuck. ``/healthz`` says whether the process
can do its work at all (its engine thread is alive); ``/readyz`` whether it is doing it
(models loaded and warm, database and broker reachable, partitions assigned).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from segue.embedding.engine import EmbeddingEngine
from segue.metrics import REGISTRY

log = logging.getLogger("segue.worker.ops")

PORTS_TRIED = 32  # a second worker on the host takes the next free port
CHECK_TIMEOUT_S = 2.0


class Probed(Protocol):
    """What the endpoint serves: a worker's state, or a supervisor's view of the workers it runs."""

    def metrics(self) -> bytes: ...

    def health(self) -> tuple[bool, dict]: ...

    def readiness(self) -> tuple[bool, dict]: ...


class WorkerState:
    """What the worker knows about itself, shared between the event loop and the endpoint's thread."""

    def __init__(self, engine: EmbeddingEngine, database_url: str, bootstrap: str):
        self.engine = engine
        self.database_url = database_url
        self.bootstrap = bootstrap
        self.started = time.time()
        self._since = time.monotonic()
        self.models_warm = False
        self.assigned: list[str] | None = None  # topic/partition names, once the group assigned them
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def processed(self, count: int) -> None:
        """Record ``count`` records processed now (for the events-per-second figure)."""
        now = time.monotonic()
        with self._lock:
            self._events.append((now, count))
            while self._events and now - self._events[0][0] > 60:
                self._events.popleft()

    def events_per_second(self) -> float:
        """Records processed a second over the last minute."""
        now = time.monotonic()
        with self._lock:
            recent = sum(count for at, count in self._events if now - at <= 60)
        return recent / max(min(60.0, now - self._since), 1.0)

    def state(self) -> str:
        """loading (models), waiting (for partitions), ready, or failed (the engine thread is gone)."""
        if not self.engine.alive:
            return "failed"
        if not self.models_warm:
            return "loading"
        return "waiting" if self.assigned is None else "ready"

    def metrics(self) -> bytes:
        """This process's metrics in Prometheus' text format."""
        return generate_latest(REGISTRY)

    def health(self) -> tuple[bool, dict]:
        alive = self.engine.alive
        return alive, {"engine_thread": "alive" if alive else "gone"}

    def readiness(self) -> tuple[bool, dict]:
        checks = {
            "models_warm": self.models_warm,
            "database": _database_reachable(self.database_url),
            "broker": _broker_reachable(self.bootstrap),
            "partitions_assigned": self.assigned is not None,
            "engine_thread": self.engine.alive,
        }
        return all(checks.values()), {**checks, "partitions": self.assigned or []}


def _database_reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=int(CHECK_TIMEOUT_S), autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _broker_reachable(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=CHECK_TIMEOUT_S):
                return True
        except OSError:
            continue
    return False


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        log.debug(format, *args)


def _app(state: Probed) -> Callable:
    def respond(start_response, status: str, body: bytes, content_type: str) -> list[bytes]:
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def check(start_response, result: tuple[bool, dict]) -> list[bytes]:
        ok, detail = result
        body = json.dumps({"ok": ok, **detail}).encode()
        return respond(start_response, "200 OK" if ok else "503 Service Unavailable", body, "application/json")

    def application(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return respond(start_response, "200 OK", state.metrics(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return check(start_response, state.health())
        if path == "/readyz":
            return check(start_response, state.readiness())
        return respond(start_response, "404 Not Found", b"not found\n", "text/plain")

    return application


def serve(state: Probed, host: str, port: int) -> str:
    """Serve the endpoint on ``host``, on ``port`` or the next free one (0: any free port); returns its base URL."""
    for candidate in range(port, port + PORTS_TRIED) if port else [0]:
        try:
            server = make_server(host, candidate, _app(state), server_class=_Server, handler_class=_QuietHandler)
        except OSError:
            continue
        threading.Thread(target=server.serve_forever, name="segue-ops", daemon=True).start()
        return f"http://{host}:{server.server_port}"
    raise OSError(f"no free port for the metrics endpoint in {port}–{port + PORTS_TRIED - 1} on {host}")
