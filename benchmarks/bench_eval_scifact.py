"""``segue eval --scifact`` on the whole bundled SciFact corpus, against the reference figures.

    python benchmarks/bench_eval_scifact.py            # 5,183 abstracts, 300 queries (about 6 min on 2 cores)

Embeds every abstract with Segue's engine (all-MiniLM-L6-v2 and the 256-d model2vec model
distilled from it) into embedded services of its own, then runs the installed ``segue eval``
both ways and prints its nDCG@10 beside the reference (sentence-transformers / model2vec exact
search, ``benchmarks/scifact_reference.py``): MiniLM 0.645, static 0.396.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segue.control import migration, registry
from segue.devtools import services
from segue.devtools.corpus import scifact_documents, store_embedded
from segue.devtools.modelkit import distill_static, minilm_path
from segue.embedding.engine import EmbeddingEngine
from segue.settings import Settings, load_settings
from segue.storage import connections, upgrades

REFERENCE = {"minilm": 0.645, "static": 0.396}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=None, help="only the first N abstracts")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="segue-bench-eval-"))
    settings = Settings(data_dir=data_dir, embedded_kafka_port=29092)
    url = services.database_url(settings)
    upgrades.upgrade(settings, url)
    static_dir = distill_static(str(minilm_path()), load_settings().data_dir / "models" / "minilm-static-256", dims=256)
    corpus = list(scifact_documents(args.docs))
    engine = EmbeddingEngine.from_settings(settings)
    try:
        with connections.connect(settings, url) as conn:
            specs = [registry.register_model(conn, "static", str(static_dir)),
                     registry.register_model(conn, "minilm", str(minilm_path()))]
            vectors = {}
            for spec in specs:
                started = time.perf_counter()
                vectors[spec] = engine.embed_sync(spec, [d.text for d in corpus])
                print(f"embedded {len(corpus)} abstracts with {spec.name} in {time.perf_counter() - started:.0f} s")
            store_embedded(conn, corpus, vectors)
            migration.start(conn, "minilm", cutover_min_coverage_pct=100.0)
        env = {**os.environ, "SEGUE_DATA_DIR": str(data_dir), "SEGUE_EMBEDDED_KAFKA_PORT": "29092"}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "segue.cli", "eval", "--scifact"], env=env, check=True)
        print(f"segue eval took {time.perf_counter() - started:.0f} s; reference nDCG@10: "
              f"minilm {REFERENCE['minilm']}, static {REFERENCE['static']} (full corpus)")
    finally:
        engine.close()
        services.down(settings)


if __name__ == "__main__":
    main()
