"""A real OpenAI-compatible embeddings server and a fault-injecting proxy in front of it, for tests.

``InfinityServer`` runs infinity-emb (installed once into its own virtualenv by ``infinity_executable``)
on local model folders; it serves ``POST /embeddings`` and ``GET /models`` at its base URL (no ``/v1``).
``FaultProxy`` is our own aiohttp server that forwards to it and, on request, answers like a misbehaving
provider: rate limits, outages, slowness, wrong dimensions, broken JSON, bad keys, context-length
errors, or a different model swapped in behind the same name. It keeps a log of every request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from tests.harness import ROOT, free_port

INFINITY_REQUIREMENTS = ("infinity-emb[server,torch]==0.0.78", "torch==2.13.0")
READY_TIMEOUT = 180.0
FAULTS: dict[str, dict[str, float]] = {
    "rate_limited": {"retry_after": 1},
    "unavailable": {"retry_after": 1},
    "server_error": {},
    "slow": {"delay_s": 30.0},
    "wrong_dimension": {},
    "malformed": {},
    "unauthorized": {},
}


def infinity_venv() -> Path:
    """The dedicated infinity-emb virtualenv: ``$SEGUE_INFINITY_VENV`` or ``<repo>/.venv-infinity``."""
    return Path(os.environ.get("SEGUE_INFINITY_VENV", ROOT / ".venv-infinity"))


def infinity_executable() -> Path:
    """The ``infinity_emb`` console script, installing its virtualenv first if it is missing or unfinished.

    A marker file naming the installed requirements is written last, so a half-built venv (or one
    built for other pins) is rebuilt; a file lock keeps two processes from installing at once.
    """
    venv = infinity_venv()
    marker = venv / ".segue-installed"
    wanted = "\n".join(INFINITY_REQUIREMENTS) + "\n"
    lock_path = Path(tempfile.gettempdir()) / f"segue-infinity-{hashlib.sha1(str(venv).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.is_file() and marker.read_text() == wanted):
            shutil.rmtree(venv, ignore_errors=True)
            log = Path(tempfile.mkdtemp(prefix="infinity-venv-")) / "install.log"
            with open(log, "w") as out:
                for step in (
                    [sys.executable, "-m", "venv", str(venv)],
                    [str(venv / "bin" / "pip"), "install", *INFINITY_REQUIREMENTS],
                ):
                    if subprocess.run(step, check=False, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                        raise RuntimeError(f"{' '.join(step)} failed; see {log}:\n{_tail(log)}")
            marker.write_text(wanted)
    return venv / "bin" / "infinity_emb"


def cls_pooled_copy(src: Path, dst: Path) -> Path:
    """Copy a sentence-transformers folder to ``dst`` (replacing it) with CLS pooling instead of its own.

    For all-MiniLM-L6-v2 this gives another 384-d model: the two agree on no normal sentence
    (cosine about 0.6), which is how a provider silently swapping the model behind a name looks.
    """
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    config_path = dst / "1_Pooling" / "config.json"
    config = json.loads(config_path.read_text())
    for key in config:
        if key.startswith("pooling_mode_"):
            config[key] = key == "pooling_mode_cls_token"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dst


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class InfinityServer:
    """infinity-emb serving local model folders on CPU, offline, on 127.0.0.1; a context manager.

    ``models`` maps each served model name to its folder. ``url`` is the base URL: infinity serves
    ``POST {url}/embeddings``, ``GET {url}/models`` and ``GET {url}/health``.
    """

    def __init__(self, models: Mapping[str, Path], log_dir: Path | None = None) -> None:
        self.models = dict(models)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="infinity-")) / "infinity.log"
        self._process: subprocess.Popen | None = None

    def start(self) -> InfinityServer:
        """Start the server and wait until it lists every model; fail with the log's tail otherwise."""
        command = [str(infinity_executable()), "v2"]
        for name, folder in self.models.items():
            command += ["--model-id", str(folder), "--served-model-name", name]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--engine", "torch", "--device", "cpu",
                    "--no-model-warmup"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        while (listed := self._listed_models()) != set(self.models):
            if self._process.poll() is not None:
                raise RuntimeError(f"infinity exited with {self._process.returncode}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"infinity not ready after {READY_TIMEOUT:.0f}s (lists {listed}):\n"
                                   f"{_tail(self.log_path)}")
            time.sleep(0.2)
        return self

    def _listed_models(self) -> set[str] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as response:
                return {model["id"] for model in json.load(response)["data"]}
        except (OSError, ValueError, KeyError):
            return None

    def close(self) -> None:
        """Terminate the server; kill it if it has not exited after 10 s."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> InfinityServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class ProxyRecord:
    """One request the proxy answered. ``input_chars`` adds up the inputs' lengths; ``fault`` names
    the injected fault or the rule that applied (None for a plain forward)."""

    at: float
    path: str
    model: str | None
    inputs: int
    input_chars: int
    texts: list[str]
    status: int
    fault: str | None
    seconds: float


def _error(status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None,
           ) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _unauthorized() -> web.Response:
    return _error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key")


def _drop_last_component(embedding: list[float] | str) -> list[float] | str:
    if isinstance(embedding, str):  # base64 of little-endian float32
        return base64.b64encode(base64.b64decode(embedding)[:-4]).decode()
    return embedding[:-1]


class ThreadedServer:
    """An aiohttp server on 127.0.0.1 in a thread and event loop of its own; a context manager.

    A subclass adds its routes in :meth:`_routes` (and may open what they need there) and frees it in
    :meth:`_on_shutdown`; ``url`` is the base URL once started.
    """

    thread_name = "test-server"

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.thread_name, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self):
        """Start serving on a free port; ``url`` is then the base URL."""
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=30)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def close(self) -> None:
        """Stop serving and end the server's thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _on_shutdown(self) -> None:
        """Free what :meth:`_routes` opened (after the server stopped)."""

    async def _serve(self) -> int:
        app = web.Application(client_max_size=64 * 2**20)
        self._routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return self._runner.addresses[0][1]

    async def _shutdown(self) -> None:
        await self._runner.cleanup()  # waits a second for requests in flight
        await self._on_shutdown()
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}  # such as a "slow" fault still asleep
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


class FaultProxy(ThreadedServer):
    """An OpenAI-style embeddings proxy on 127.0.0.1 that can misbehave on purpose; a context manager.

    It forwards ``POST /embeddings``, ``POST /v1/embeddings``, ``GET /models`` and ``GET /v1/models``
    to ``upstream``'s ``/embeddings`` and ``/models``. Its aiohttp server runs in a thread of its own.
    Set ``expected_key`` to demand ``Authorization: Bearer <key>`` on every request.
    """

    thread_name = "fault-proxy"

    def __init__(self, upstream: str, expected_key: str | None = None) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.expected_key = expected_key
        self._lock = threading.Lock()
        self._records: list[ProxyRecord] = []
        self._pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._max_chars: int | None = None
        self._model_map: dict[str, str] = {}
        self._session: ClientSession | None = None

    def _routes(self, app: web.Application) -> None:
        for prefix in ("", "/v1"):
            app.router.add_post(f"{prefix}/embeddings", self._handle)
            app.router.add_get(f"{prefix}/models", self._handle)
        self._session = ClientSession(timeout=ClientTimeout(total=300))

    async def _on_shutdown(self) -> None:
        await self._session.close()

    def inject(self, kind: str, times: int = 1, **params: float) -> None:
        """Queue fault ``kind`` for the next ``times`` embeddings requests, after any already queued.

        Kinds and their params: rate_limited (429) and unavailable (503), each with a ``Retry-After``
        of ``retry_after`` seconds (default 1); server_error (500); slow (wait ``delay_s`` seconds,
        default 30, then forward); wrong_dimension (forward, then drop every embedding's last
        component, float lists and base64 alike); malformed (200 whose JSON body is cut short);
        unauthorized (401, as for a wrong key).
        """
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {sorted(FAULTS)}")
        if unknown := set(params) - set(FAULTS[kind]):
            raise TypeError(f"fault {kind!r} takes no {sorted(unknown)}")
        with self._lock:
            self._pending.extend([(kind, {**FAULTS[kind], **params})] * times)

    def reject_inputs_longer_than(self, chars: int | None) -> None:
        """Answer 400 context_length_exceeded to any request with an input over ``chars`` characters;
        None lifts the rule. A queued fault that answers by itself (not slow, not wrong_dimension) comes first."""
        with self._lock:
            self._max_chars = chars

    def rewrite_model(self, mapping: dict[str, str] | None) -> None:
        """Forward requests for ``model`` as ``mapping[model]`` and answer with the asked name, so the
        client cannot tell; None lifts the rule."""
        with self._lock:
            self._model_map = dict(mapping or {})

    def records(self) -> list[ProxyRecord]:
        """A copy of the log, oldest first."""
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        """Empty the log."""
        with self._lock:
            self._records.clear()

    def reset(self) -> None:
        """Empty the log, drop queued faults, lift both rules and forget ``expected_key``."""
        with self._lock:
            self._records.clear()
            self._pending.clear()
            self._max_chars = None
            self._model_map = {}
            self.expected_key = None

    async def _handle(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        body = await request.read()
        try:
            payload: Any = json.loads(body) if request.method == "POST" else {}
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        raw = payload.get("input")
        items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        texts = [text for text in items if isinstance(text, str)]
        model = payload.get("model")
        response, fault = await self._answer(request, body, payload, texts)
        record = ProxyRecord(at=started, path=request.path, model=model, inputs=len(texts),
                             input_chars=sum(map(len, texts)), texts=texts, status=response.status, fault=fault,
                             seconds=time.monotonic() - started)
        with self._lock:
            self._records.append(record)
        return response

    async def _answer(self, request: web.Request, body: bytes, payload: dict, texts: list[str],
                      ) -> tuple[web.Response, str | None]:
        embeddings = request.method == "POST"
        key = self.expected_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return _unauthorized(), "unauthorized"  # before any fault, which stays queued
        with self._lock:
            max_chars, model_map = self._max_chars, self._model_map
            kind, params = self._pending.popleft() if embeddings and self._pending else (None, {})
        if kind == "unauthorized":
            return _unauthorized(), kind
        if kind in ("rate_limited", "unavailable"):
            headers = {"Retry-After": str(params["retry_after"])}
            if kind == "rate_limited":
                return _error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded", headers), kind
            return _error(503, "The server is overloaded or not ready yet.", "server_error", None, headers), kind
        if kind == "server_error":
            return _error(500, "The server had an error while processing your request.", "server_error", None), kind
        if kind == "malformed":
            return web.Response(status=200, body=b'{"data": [', content_type="application/json"), kind
        if kind == "slow":
            await asyncio.sleep(params["delay_s"])
        longest = max(map(len, texts), default=0)
        if max_chars is not None and longest > max_chars:
            message = f"This model's maximum context length is 256 tokens, however you requested {longest} tokens"
            return _error(400, message, "invalid_request_error", "context_length_exceeded"), "context_length"
        asked = payload.get("model")
        swapped = embeddings and asked in model_map
        if swapped:
            body = json.dumps({**payload, "model": model_map[asked]}).encode()
        response = await self._forward(request, body)
        if response.status == 200 and (swapped or kind == "wrong_dimension"):
            answer = json.loads(response.body)
            if swapped:
                answer["model"] = asked
            if kind == "wrong_dimension":
                for item in answer["data"]:
                    item["embedding"] = _drop_last_component(item["embedding"])
            response = web.json_response(answer)
        return response, kind or ("swapped" if swapped else None)

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        target = self.upstream + request.path.removeprefix("/v1")
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        try:
            async with self._session.request(request.method, target, data=body or None, headers=headers) as upstream:
                content = await upstream.read()
                content_type = upstream.headers.get("Content-Type", "application/json")
                return web.Response(status=upstream.status, body=content, headers={"Content-Type": content_type})
        except ClientError as exc:
            return _error(502, f"upstream unreachable: {exc}", "server_error", None)
