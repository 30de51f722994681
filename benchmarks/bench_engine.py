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

from segue.devtools.corpus import scifact_documents
from segue.devtools.modelkit import minilm_path
from segue.embedding.engine import EmbeddingEngine
from segue.embedding.providers import inspect
from segue.spec import ModelSpec


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
    gflops: float  # useful (unpadded) FLOPs a second the engine sustained
    peak_gflops: float  # the same threads' measured float32 matrix-product rate


def timed(engine: EmbeddingEngine, spec: ModelSpec, texts: list[str], warm_up: int = 8) -> tuple[np.ndarray, float, str]:
    """Vectors of ``texts``, their seconds after a warm-up on the first ``warm_up``, and the device; closes ``engine``.

    The warm-up also teaches the engine the model's speed on this device, which sizes the chunks."""
    try:
        for _ in range(2):  # the second round is cut in chunks sized by what the first taught
            engine.embed_sync(spec, texts[:warm_up])
        device = engine.device_of(spec)
        started = time.perf_counter()
        vectors = engine.embed_sync(spec, texts)
        return vectors, time.perf_counter() - started, device
    finally:
        engine.close()


def engine_vs_reference(texts: list[str], source: Path | None = None) -> AgainstReference:
    """Time Segue's engine (default settings) and ``SentenceTransformer.encode`` (batch 32) on ``texts``."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig

    source = source or minilm_path()
    spec = ModelSpec.from_profile(1, "bench", str(source), inspect(str(source)))
    engine = EmbeddingEngine()
    lengths = [min(count, spec.max_tokens) for count in engine.count_tokens(spec, texts)]
    ours, engine_seconds, device = timed(engine, spec, texts)
    reference = SentenceTransformer(str(source), device=device)
    if device == "cuda":
        reference.half()
    reference.encode(texts[:8])
    started = time.perf_counter()
    theirs = reference.encode(texts, batch_size=32, normalize_embeddings=True)
    reference_seconds = time.perf_counter() - started
    peak = matmul_peak_tflops("cpu", torch.float32, 1024) if device == "cpu" else matmul_peak_tflops()
    return AgainstReference(len(texts) / engine_seconds, len(texts) / reference_seconds,
                            float((ours * np.asarray(theirs, dtype=np.float32)).sum(axis=1).min()), device,
                            encoder_flops(AutoConfig.from_pretrained(source), lengths) / engine_seconds / 1e9,
                            peak * 1e3)


def encoder_flops(config, lengths: list[int]) -> float:
    """Floating-point operations of a BERT-style encoder over texts of ``lengths`` tokens (no padding counted).

    Per layer and token: the Q, K, V and output projections (4·d² multiply-adds), the feed-forward
    pair (2·d·ff), and attention's scores and weighted sum (2·n·d for a text of n tokens).
    """
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return float(sum(2 * layers * n * (4 * d * d + 2 * d * ff + 2 * n * d) for n in lengths))


def matmul_peak_tflops(device: str = "cuda", dtype=torch.float16, size: int = 8192) -> float:
    """The device's measured dense matrix-product rate in ``dtype`` (on the CPU: on torch's threads): the
    median of 20 products of two ``size``² matrices, after 3 warm-ups."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for run in range(23):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if run >= 3:
            times.append(time.perf_counter() - started)
    return 2 * size**3 / float(np.median(times)) / 1e12


@dataclass(frozen=True)
class GpuEncode:
    """The engine's fp16 rate on a GPU against sentence-transformers', with its model FLOP utilisation."""

    engine_per_s: float
    reference_per_s: float
    min_cosine: float
    tflops: float  # useful (unpadded) FLOPs a second the engine sustained
    peak_tflops: float  # measured dense fp16 matrix-product rate of the same device
    by_batch_size: dict[int, float]  # engine docs/s for each cap on the texts of one forward pass

    @property
    def mfu(self) -> float:
        return self.tflops / self.peak_tflops


def gpu_encode(source: Path, texts: list[str], reference_texts: int, batch_sizes: list[int]) -> GpuEncode:
    """The engine (fp16, default chunking, each batch-size cap) on ``texts`` and ``SentenceTransformer.encode``
    (fp16, batch 256) on the first ``reference_texts`` of them; cosines on those."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig

    profile = inspect(str(source), options={"dtype": "float16"})
    spec = ModelSpec.from_profile(1, "bench", str(source), profile)
    rates = {}
    for batch_size in batch_sizes:
        vectors, seconds, _ = timed(EmbeddingEngine(batch_size=batch_size), spec, texts, warm_up=2048)
        rates[batch_size] = len(texts) / seconds
    best = max(rates, key=rates.get)
    engine = EmbeddingEngine(batch_size=best)
    lengths = [min(count, spec.max_tokens) for count in engine.count_tokens(spec, texts)]
    vectors, seconds, _ = timed(engine, spec, texts, warm_up=2048)
    reference = SentenceTransformer(str(source), device="cuda").half()
    reference.encode(texts[:256], batch_size=256)
    started = time.perf_counter()
    theirs = reference.encode(texts[:reference_texts], batch_size=256, normalize_embeddings=True)
    reference_seconds = time.perf_counter() - started
    flops = encoder_flops(AutoConfig.from_pretrained(source), lengths)
    return GpuEncode(len(texts) / seconds, reference_texts / reference_seconds,
                     float((vectors[:reference_texts] * np.asarray(theirs, dtype=np.float32)).sum(axis=1).min()),
                     flops / seconds / 1e12, matmul_peak_tflops(), rates)


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
          f"min cosine {versus.min_cosine:.6f}; the engine sustained {versus.gflops:,.1f} GFLOP/s of "
          f"{versus.peak_gflops:,.1f} measured for a matrix product on the same threads")


if __name__ == "__main__":
    main()
