"""Provider ``static``: a model2vec static model (an embedding matrix and a tokenizer), computed with numpy.

No options. model2vec comes with the ``demo`` extra and is imported only when a static
model is inspected or loaded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segue.providers.base import Prepared, checked_options, fingerprint, resolve_source
from segue.spec import ModelProfile, ModelSpec

NAME = "static"


def is_static_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a model2vec model (as ``StaticModel.save_pretrained`` writes it)."""
    config = _read_json(folder / "config.json") or {}
    modules = _read_json(folder / "modules.json") or []
    return (folder / "model.safetensors").is_file() and (
        config.get("model_type") == "model2vec"
        or any(module["type"].endswith(".StaticEmbedding") for module in modules)
    )


def inspect(source: str, options: Mapping[str, Any]) -> ModelProfile:
    """Load the model at ``source`` and profile it."""
    checked_options(NAME, options, {})
    return _read(resolve_source(source))[0]


def load(spec: ModelSpec, device: str | None) -> StaticEmbedder:
    """The registered model; it always computes on the CPU, whatever ``device`` says."""
    profile, model = _read(resolve_source(spec.source))
    return StaticEmbedder(profile, model)


class StaticEmbedder:
    """The mean of the text's token vectors (model2vec).

    model2vec's ``encode`` changes its tokenizer's truncation while it runs, so counting and
    embedding take turns with the tokenizer.
    """

    device = "cpu"

    def __init__(self, profile: ModelProfile, model):
        self.profile = profile
        self._model = model
        self._tokenizer_lock = threading.Lock()

    def prepare(self, texts: Sequence[str]) -> Prepared:
        texts = list(texts)
        with self._tokenizer_lock:
            return Prepared([len(encoding.ids) for encoding in self._model.tokenizer.encode_batch(texts)], texts)

    def embed(self, prepared: Prepared) -> np.ndarray:
        with self._tokenizer_lock:
            vectors = self._model.encode(prepared.inputs, max_length=self.profile.max_tokens or None,
                                         normalize=False, use_multiprocessing=False)
        return vectors.astype(np.float32, copy=False)

    def close(self) -> None:
        self._model = None


def model2vec():
    """The model2vec package, or a clear error naming the extra that brings it."""
    try:
        import model2vec
        import model2vec.distill
    except ImportError as exc:
        raise ModuleNotFoundError("static (model2vec) models need the 'demo' extra: pip install 'segue[demo]'") from exc
    return model2vec


def _read(folder: Path) -> tuple[ModelProfile, Any]:
    model = model2vec().StaticModel.from_pretrained(folder)
    tensors = {"embedding": model.embedding}
    if model.weights is not None:
        tensors["weights"] = model.weights
    if model.token_mapping is not None:
        tensors["token_mapping"] = model.token_mapping
    max_tokens = model.max_length or 0
    identity = {"kind": NAME, "dim": int(model.dim), "pooling": "none", "normalize": bool(model.normalize),
                "max_tokens": max_tokens}
    profile = ModelProfile(provider=NAME, dim=int(model.dim), max_tokens=max_tokens,
                           config={"normalize": bool(model.normalize)},
                           fingerprint=fingerprint(tensors, model.tokenizer.get_vocab(), identity))
    return profile, model


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None
