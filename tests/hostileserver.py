"""A hostile OpenAI-compatible embeddings server, for tests: it computes its own vectors and misbehaves on purpose.

Unlike the fault proxy (``tests/apiserver.py``), which forwards to a real model server,
``HostileServer`` answers by itself, at once: the vector of a text is seeded by the text's
sha256 (:func:`vector_of`), so a test knows exactly what a well-behaved answer holds and
needs no model. It speaks ``POST /embeddings`` and ``GET /models`` (also under ``/v1``),
with ``encoding_format`` ``float`` or ``base64``, and answers like OpenAI's API where that
matters: an empty input is refused with a 400.

Markers in a text make that one item of an answer misbehave (while :attr:`markers_active`):

====================  ==================================================================
``[nan]``             the vector holds NaN
``[inf]``             the vector holds +Infinity (float format: the JSON literal)
``[null]``            a component is ``null`` (base64: a string that is not whole float32s)
``[zero]``            every component is 0
``[narrow]``          the vector is one component short
``[string]``          the components are strings, one of them ``"1e400"``
``[refuse]``          the whole request is answered 400, naming that input
====================  ==================================================================

Faults queued with :meth:`inject` make the next answers misbehave as a whole: ``shuffled``
(items out of order: allowed), ``duplicate_index``, ``missing_index``, ``extra_index``,
``string_index``, ``huge_body`` (a 200 whose body never ends), ``slow_drip`` (a 200 whose
body comes a byte at a time), ``retry_after_nan`` (a 429 with ``Retry-After: NaN``). Rules
hold until lifted: ``max_inputs`` answers larger requests with nginx's HTML 413 page,
``refuse_everything`` answers 404 "model not found", ``expected_key`` answers a wrong
key with a 401 that echoes it back, and ``nan_texts`` gives those texts (unmarked ones too:
canaries, stored bodies) NaN vectors.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from tests.apiserver import ThreadedServer

MARKERS = ("[nan]", "[inf]", "[null]", "[zero]", "[narrow]", "[string]", "[refuse]")
FAULTS = ("shuffled", "duplicate_index", "missing_index", "extra_index", "string_index", "huge_body", "slow_drip",
          "retry_after_nan")
NGINX_413 = ("<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request "
             "Entity Too Large</h1></center>\r\n<hr><center>nginx/1.27.2</center>\r\n</body>\r\n</html>\r\n")


def vector_of(text: str, dim: int) -> np.ndarray:
    """The vector a well-behaved answer holds for ``text`` (float32, not normalised)."""
    seed = int.from_bytes(hashlib.sha256(text.encode(errors="surrogatepass")).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


@dataclass(frozen=True)
class Answered:
    """One request the server answered: its inputs, the status, and the fault or rule that applied (None: none)."""

    texts: list[str]
    status: int
    fault: str | None
    at: float


class HostileServer(ThreadedServer):
    """An OpenAI-style embeddings server on 127.0.0.1 that misbehaves on purpose; a context manager."""

    thread_name = "hostile-server"

    def __init__(self, dim: int = 32, served_model: str = "hostile") -> None:
        super().__init__()
        self.dim = dim
        self.served_model = served_model
        self.markers_active = True
        self.max_inputs: int | None = None
        self.refuse_everything = False
        self.expected_key: str | None = None
        self.nan_texts: set[str] = set()
        self._lock = threading.Lock()
        self._log: list[Answered] = []
        self._pending: collections.deque[str] = collections.deque()

    def inject(self, fault: str, times: int = 1) -> None:
        """Answer the next ``times`` embeddings requests with ``fault`` (after those already queued)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        with self._lock:
            self._pending.extend([fault] * times)

    def answered(self) -> list[Answered]:
        """A copy of the log of embeddings requests, oldest first."""
        with self._lock:
            return list(self._log)

    def clear(self) -> None:
        """Empty the log."""
        with self._lock:
            self._log.clear()

    def reset(self) -> None:
        """Empty the log, drop queued faults, lift every rule and make markers work again."""
        with self._lock:
            self._log.clear()
            self._pending.clear()
        self.markers_active = True
        self.max_inputs = None
        self.refuse_everything = False
        self.expected_key = None
        self.nan_texts = set()

    def _routes(self, app: web.Application) -> None:
        for prefix in ("", "/v1"):
            app.router.add_post(f"{prefix}/embeddings", self._embeddings)
            app.router.add_get(f"{prefix}/models", self._models)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served_model, "object": "model"}]})

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        raw = payload.get("input")
        texts = [raw] if isinstance(raw, str) else list(raw)
        answer, applied = self._answer(request, payload, texts)
        with self._lock:
            self._log.append(Answered(texts, answer.status if isinstance(answer, web.Response) else 200, applied,
                                      time.monotonic()))
        return answer if isinstance(answer, web.Response) else await self._stream(request, answer, applied)

    def _answer(self, request: web.Request, payload: dict, texts: list[str]) -> tuple[web.Response | dict, str | None]:
        """The response, or for a streamed fault the body to stream, and the fault or rule that applied.

        The rules come first; a queued fault is taken only by a request they let through."""
        sent_key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.expected_key is not None and sent_key != self.expected_key:
            return _error(401, f"Incorrect API key provided: {sent_key}. You can find your API key at "
                          "https://platform.example/account/api-keys.", "invalid_api_key"), "unauthorized"
        if self.refuse_everything:
            return _error(404, f"The model `{payload.get('model')}` does not exist or you do not have access to it.",
                          "model_not_found"), "refuse_everything"
        if self.max_inputs is not None and len(texts) > self.max_inputs:
            return web.Response(status=413, text=NGINX_413, content_type="text/html"), "html_413"
        for index, text in enumerate(texts):
            if text == "":
                return _error(400, "'$.input' is invalid. Please check the API reference: "
                              "https://platform.openai.com/docs/api-reference.", None), "empty_input"
            if self.markers_active and "[refuse]" in text:
                return _error(400, f"Input {index} was flagged by the content filter.", "content_filter"), "refuse"
        with self._lock:
            fault = self._pending.popleft() if self._pending else None
        if fault == "retry_after_nan":
            return _error(429, "Rate limit reached for requests", "rate_limit_exceeded",
                          headers={"Retry-After": "NaN"}), fault
        base64_format = payload.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i, "embedding": self._embedding(text, base64_format)}
                for i, text in enumerate(texts)]
        if fault == "shuffled":
            data.reverse()
        elif fault == "duplicate_index" and len(data) > 1:
            data[1]["index"] = 0
        elif fault == "missing_index":
            data.pop()
        elif fault == "extra_index":
            data.append({**data[0], "index": len(data)})
        elif fault == "string_index":
            for item in data:
                item["index"] = str(item["index"])
        body = {"object": "list", "data": data, "model": payload.get("model"),
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}
        if fault in ("huge_body", "slow_drip"):
            return body, fault
        return web.Response(status=200, text=json.dumps(body), content_type="application/json"), fault

    def _embedding(self, text: str, base64_format: bool) -> Any:
        vector = vector_of(text, self.dim)
        marked = [marker for marker in MARKERS if marker in text] if self.markers_active else []
        if "[zero]" in marked:
            vector = np.zeros_like(vector)
        if "[narrow]" in marked:
            vector = vector[:-1]
        if "[nan]" in marked or text in self.nan_texts:
            vector[0] = np.nan
        if "[inf]" in marked:
            vector[0] = np.inf
        if "[string]" in marked:
            return ["1e400"] + [repr(float(x)) for x in vector[1:]]
        if "[null]" in marked:
            return base64.b64encode(vector.astype("<f4").tobytes())[:-4].decode() if base64_format else (
                [None] + [float(x) for x in vector[1:]])
        if base64_format:
            return base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return [float(x) for x in vector]  # json.dumps writes NaN and Infinity as bare literals

    @staticmethod
    async def _stream(request: web.Request, body: dict, fault: str) -> web.StreamResponse:
        """A 200 whose body never ends (``huge_body``) or comes a byte every 50 ms (``slow_drip``)."""
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        encoded = json.dumps(body).encode()
        try:
            if fault == "huge_body":
                await response.write(encoded[:-1])
                padding = b" " * 65536
                for _ in range(4096):  # 256 MiB at most, unless the client hangs up first
                    await response.write(padding)
            else:
                for byte in encoded:
                    await response.write(bytes([byte]))
                    await asyncio.sleep(0.05)
            await response.write_eof()
        except ConnectionError:  # the client hung up, as it should
            pass
        return response


def _error(status: int, message: str, code: str | None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)
