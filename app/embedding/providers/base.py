"""The interface every provider implements, and what local providers share: sources and fingerprints.

A provider is one module in this package with two functions:

* ``inspect(source, options) -> ModelProfile`` — at registration: load the model once and
  say what it is (dim, input limit, the settings that shape its vectors, its fingerprint);
  ``options`` is the provider's pydantic model, already validated (see ``options``);
* ``load(spec, device) -> Embedder`` — in a worker or reader: the registered model, ready.

An :class:`Embedder` only turns texts into vectors, in two steps: ``prepare`` (tokenization,
CPU work that the engine overlaps with the previous forward pass) and ``embed`` (the forward
pass); ``token_spans`` tells a chunked model's splitter where its tokens are. Batching, priorities, threads, normalisation and the dimension and fingerprint checks
are the engine's. A model behind an
API (``remote = True``, see ``openai``) also offers ``submit(texts, priority)``, a future of
(raw vectors, tokens per text, the texts its endpoint rejected) computed on its own event
loop, ``halted`` (why Segue stopped writing it, or None) and ``billed_tokens``; the engine
awaits it instead of running ``embed`` on its thread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from segue.spec import ModelProfile


class OptionsError(ValueError):
    """Registration options a provider does not accept."""


@dataclass(frozen=True)
class Prepared:
    """Texts made ready for one forward pass of one model."""

    tokens: list[int]  # tokens each text takes as input, before truncation to the model's limit
    inputs: Any  # what the model's ``embed`` takes: token ids, tensors, or the texts themselves


class Embedder(Protocol):
    """A loaded model."""

    profile: ModelProfile  # as computed from what was loaded: its fingerprint must match the registry's
    device: str  # where it runs, for logs and plans

    def prepare(self, texts: Sequence[str]) -> Prepared:
        """Tokenize ``texts`` once: their token counts, and the inputs of :meth:`embed`.

        Called from any thread, possibly while :meth:`embed` runs on another batch.
        """

    def embed(self, prepared: Prepared) -> np.ndarray:
        """One vector per prepared text, ``(len(prepared.tokens), profile.dim)``; the engine normalises them."""

    def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """The (start, end) characters of each content token of each text (no special tokens): what a chunked
        model's splitter counts and cuts by (see :mod:`segue.embedding.chunking`)."""

    def close(self) -> None:
        """Free what the model holds (device memory)."""


def resolve_source(source: str) -> Path:
    """The local folder for ``source``: the folder itself, or a hub id's snapshot in the local HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError) as exc:
        raise FileNotFoundError(
            f"model source {source!r} is neither a local folder nor a model in the local Hugging Face cache"
        ) from exc


def fingerprint(tensors: Mapping[str, Any], vocab: Mapping[str, int], settings: Mapping[str, Any]) -> str:
    """sha256 over the settings, the tensors (sorted by name: name, dtype, shape, bytes) and the vocabulary.

    Tensors are numpy arrays or torch tensors (read through ``.detach()``, without importing torch here).
    """
    digest = hashlib.sha256()
    digest.update(b"settings\0" + json.dumps(dict(settings), sort_keys=True).encode() + b"\0")
    for name in sorted(tensors):
        dtype, shape, data = _raw(tensors[name])
        digest.update(f"tensor\0{name}\0{dtype}\0{shape}\0{data.nbytes}\0".encode())
        digest.update(data)
    digest.update(b"vocab\0" + json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return digest.hexdigest()


def _raw(value: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """dtype name, shape and a zero-copy byte view of a tensor or array."""
    if hasattr(value, "detach"):  # a torch tensor: torch is loaded already
        import torch

        tensor = value.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), memoryview(data)
    array = np.ascontiguousarray(value)
    return array.dtype.name, tuple(array.shape), memoryview(array.reshape(-1).view(np.uint8))
