"""Benchmark: embedding throughput of the engine on real SciFact abstracts.

Uses all-MiniLM-L6-v2 (the ``demo`` extra), or with ``--skeleton DIR`` a model of the
same architecture with random weights built from that folder's config and tokenizer
files (for machines without the weights, e.g. a lent GPU). Prints texts/s per batch
size on the engine's device (CUDA in fp16 when present), then the engine with its
default chunking against ``SentenceTransformer.encode`` on the same texts and threads.

    PYTHONPATH=. python benchmarks/bench_engine.py [--docs N] [--batch-sizes 32,64] [--skeleton DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import torch

from segue.corpus import scifact_documents
from segue.engine import EmbeddingEngine
from segue.spec import ModelSpec
from segue.modelkit import minilm_path
from segue.providers import inspect


def random_weights_copy(skeleton: Path) -> Path:
    """A sentence-transformers folder with the skeleton's config and tokenizer and random weights."""
    from transformers import AutoConfig, AutoModel

    target = Path(tempfile.mkdtemp(prefix="segue-bench-model-"))
    shutil.copytree(skeleton, target, dirs_exist_ok=True)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(target)).save_pretrained(target)
    return target


@dataclass(frozen=True)
class AgainstReference:
    """The engine's rate and sentence-transformers' on the same texts, and how close their vectors are."""

    engine_per_s: float
    reference_per_s: float
    min_cosine: float
    device: str


def timed(engine: EmbeddingEngine, spec: ModelSpec, texts: list[str]) -> tuple[np.ndarray, float, str]:
    """Vectors of ``texts``, their seconds after a warm-up, and the device; closes ``engine``."""
    try:
        engine.embed_sync(spec, texts[:8])
        device = engine.device_of(spec)
        started = time.perf_counter()
        vectors = engine.embed_sync(spec, texts)
        return vectors, time.perf_counter() - started, device
    finally:
        engine.close()


def engine_vs_reference(texts: list[str], source: Path | None = None) -> AgainstReference:
    """Time Segue's engine (default settings) and ``SentenceTransformer.encode`` (batch 32) on ``texts``."""
    from sentence_transformers import SentenceTransformer

    source = source or minilm_path()
    spec = ModelSpec.from_profile(1, "bench", str(source), inspect(str(source)))
    ours, engine_seconds, device = timed(EmbeddingEngine(), spec, texts)
    reference = SentenceTransformer(str(source), device=device)
    if device == "cuda":
        reference.half()
    reference.encode(texts[:8])
    started = time.perf_counter()
    theirs = reference.encode(texts, batch_size=32, normalize_embeddings=True)
    reference_seconds = time.perf_counter() - started
    return AgainstReference(len(texts) / engine_seconds, len(texts) / reference_seconds,
                            float((ours * np.asarray(theirs, dtype=np.float32)).sum(axis=1).min()), device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--batch-sizes", default="32,64")
    parser.add_argument("--skeleton", type=Path)
    args = parser.parse_args()
    source = random_weights_copy(args.skeleton) if args.skeleton else minilm_path()
    profile = inspect(str(source))
    spec = ModelSpec.from_profile(1, "bench", str(source), profile)
    texts = [doc.text for doc in scifact_documents(args.docs)]
    print(f"{len(texts)} SciFact abstracts, model {'random-weight ' if args.skeleton else ''}MiniLM-L6 "
          f"({profile.dim}-d, max {profile.max_tokens} tokens), torch {torch.__version__}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        engine = EmbeddingEngine(batch_size=batch_size, chunk_seconds=3600)  # a fixed count a pass, not timed
        vectors, seconds, where = timed(engine, spec, texts)
        device = torch.cuda.get_device_name(0) if where == "cuda" else where
        print(f"device {device}, batch {batch_size}: {len(texts) / seconds:,.0f} texts/s "
              f"({seconds:.2f} s, vectors {vectors.shape})")
    versus = engine_vs_reference(texts, source)
    print(f"engine (default chunking) {versus.engine_per_s:,.1f} texts/s, SentenceTransformer.encode "
          f"{versus.reference_per_s:,.1f} texts/s: {versus.engine_per_s / versus.reference_per_s:.2f}x, "
          f"min cosine {versus.min_cosine:.6f}")


if __name__ == "__main__":
    main()
