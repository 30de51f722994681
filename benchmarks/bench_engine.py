"""Benchmark: embedding throughput of the engine on real SciFact abstracts.

Uses all-MiniLM-L6-v2 (the ``demo`` extra), or with ``--skeleton DIR`` a model of the
same architecture with random weights built from that folder's config and tokenizer
files (for machines without the weights, e.g. a lent GPU). Prints texts/s per batch
size on the engine's device (CUDA in fp16 when present).

    PYTHONPATH=. python benchmarks/bench_engine.py [--docs N] [--batch-sizes 32,64] [--skeleton DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

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
        engine = EmbeddingEngine(batch_size=batch_size)
        try:
            engine.embed_sync(spec, texts[:batch_size])  # load and warm up
            where = engine.device_of(spec)
            started = time.perf_counter()
            vectors = engine.embed_sync(spec, texts)
            seconds = time.perf_counter() - started
        finally:
            engine.close()
        device = torch.cuda.get_device_name(0) if where == "cuda" else where
        print(f"device {device}, batch {batch_size}: {len(texts) / seconds:,.0f} texts/s "
              f"({seconds:.2f} s, vectors {vectors.shape})")


if __name__ == "__main__":
    main()
