"""Tiny real models for tests, built once per cache folder and reused.

Each helper returns the model's folder under ``cache_dir``, building it when missing.
Models are written to a temporary folder and renamed into place, so a half-built
model is never mistaken for a finished one.
"""

from __future__ import annotations

from pathlib import Path

from segue.devtools.modelkit import build_tiny_transformer, distill_static

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


def tiny_static_wide(cache_dir: Path, dims: int = 2001) -> Path:
    """A model2vec static model wider than pgvector's HNSW limit (2,000 dims), as 3,072-d API models are.

    Its vocabulary is the words of a small fixed list plus [UNK]; its vectors are seeded random.
    """
    target = Path(cache_dir) / f"tiny-static-{dims}"
    if not (target / "model.safetensors").is_file():
        import numpy as np
        from model2vec import StaticModel
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = ["[UNK]"] + sorted(set("abstract proteins fold and cells divide document text written version "
                                       "of the a to in at with model change read miss backfill".split()))
        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        vectors = np.random.default_rng(0).standard_normal((len(words), dims)).astype(np.float32)
        StaticModel(vectors, tokenizer, normalize=True).save_pretrained(target)
    return target


def _cached(target: Path, build) -> Path:
    if not (target / "modules.json").is_file():
        build(target)
    return target
