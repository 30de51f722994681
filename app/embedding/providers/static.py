"""Provider ``static``: a model2vec static model (an embedding matrix and a tokenizer), computed with numpy.

No options. model2vec comes with the ``demo`` extra and is imported only when a static
model is inspected or loaded.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segue.embedding.providers.base import Prepared, fingerprint, resolve_source
from segue.embedding.providers.options import StaticOptions
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


def inspect(source: str, options: StaticOptions) -> ModelProfile:
    """Load the model at ``source`` and profile it (a static model takes no options)."""
    return _read(resolve_source(source))[0]


def load(spec: ModelSpec, device: str | None) -> StaticEmbedder:
    """The registered model; it always computes on the CPU, whatever ``device`` says."""
    profile, model = _read(resolve_source(spec.source))
    return StaticEmbedder(profile, model)


class StaticEmbedder:
    """The mean of a text's token vectors, as model2vec computes it, from one tokenization per text.

    ``prepare`` tokenizes without special tokens and without truncation (the count), drops
    unknown tokens as model2vec does, and keeps the first ``max_tokens`` ids; ``embed``
    averages their rows for the whole batch at once. model2vec's own ``encode`` would
    tokenize a second time, after cutting each text to ``max_tokens`` times its median
    token length in characters, which changes nothing for a text within the limit.
    """

    device = "cpu"

    def __init__(self, profile: ModelProfile, model):
        self.profile = profile
        self._tokenizer = type(model.tokenizer).from_str(model.tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._unknown = model.unk_token_id
        self._rows = np.asarray(model.embedding, dtype=np.float32)
        self._mapping = model.token_mapping
        self._weights = model.weights

    def prepare(self, texts: Sequence[str]) -> Prepared:
        ids = [encoding.ids for encoding in self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]
        if self._unknown is not None:
            ids = [[token for token in text if token != self._unknown] for text in ids]
        limit = self.profile.max_tokens or None
        return Prepared([len(text) for text in ids], [text[:limit] for text in ids])

    def embed(self, prepared: Prepared) -> np.ndarray:
        lengths = np.fromiter(map(len, prepared.inputs), dtype=np.int64, count=len(prepared.inputs))
        flat = np.fromiter(itertools.chain.from_iterable(prepared.inputs), dtype=np.int64, count=int(lengths.sum()))
        vectors = np.zeros((len(lengths), self.profile.dim), dtype=np.float32)
        if flat.size:
            rows = self._rows[flat if self._mapping is None else self._mapping[flat]]
            if self._weights is not None:
                rows = rows * self._weights[flat, None]
            known = lengths > 0
            starts = (np.cumsum(lengths) - lengths)[known]
            vectors[known] = np.add.reduceat(rows, starts, axis=0) / lengths[known, None]
        return vectors

    def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [list(encoding.offsets) for encoding in encodings]

    def close(self) -> None:
        self._rows = None


def model2vec(*, distill: bool = False):
    """The model2vec package (with its ``distill`` module when asked: importing that takes seconds, so loading a
    model does not), or a clear error naming the extra that brings it."""
    try:
        import model2vec
        if distill:
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
