"""Tiny real models for tests, built once per cache folder and reused.

Each helper returns the model's folder under ``cache_dir``, building it when missing.
Models are written to a temporary folder and renamed into place, so a half-built
model is never mistaken for a finished one.
"""

from __future__ import annotations

from pathlib import Path

from app.modelkit import build_tiny_transformer, distill_static

TINY_A_DIM = 32
TINY_B_DIM = 48
TINY_STATIC_DIM = 16


def tiny_transformer_a(cache_dir: Path) -> Path:
    """A 2-layer random BERT, hidden size 32, seed 0, mean pooling, 128-token limit."""
    return _cached(Path(cache_dir) / "tiny-a", lambda target: build_tiny_transformer(target, hidden_size=TINY_A_DIM))


def tiny_transformer_b(cache_dir: Path) -> Path:
    """Like A but hidden size 48 and seed 1: a different vector space."""
    return _cached(
        Path(cache_dir) / "tiny-b", lambda target: build_tiny_transformer(target, hidden_size=TINY_B_DIM, seed=1)
    )


def tiny_static(cache_dir: Path) -> Path:
    """A model2vec static model distilled from tiny transformer A with PCA to 16 dims (about 2 s)."""
    source = tiny_transformer_a(cache_dir)
    return distill_static(str(source), Path(cache_dir) / "tiny-static", dims=TINY_STATIC_DIM)


def _cached(target: Path, build) -> Path:
    if not (target / "modules.json").is_file():
        build(target)
    return target
