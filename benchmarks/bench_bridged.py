"""Bridged reads on SciFact: what readers of the new model get before its column is complete.

    python benchmarks/bench_bridged.py              # 5,183 abstracts, 300 queries (MiniLM embeds them once: ~5 min)
    python benchmarks/bench_bridged.py --docs 1500  # a quicker look
    python benchmarks/bench_bridged.py --to mpnet   # all-MiniLM-L6-v2 → all-mpnet-base-v2 (~35 min on 2 cores)

The migration is the 256-d model2vec model distilled from all-MiniLM-L6-v2 → all-MiniLM-L6-v2,
or with ``--to mpnet`` all-MiniLM-L6-v2 → all-mpnet-base-v2 (768-d, ``benchmarks/mpnet.py``).
Every abstract is embedded by both (cached under the system temp folder, so a second run starts
at once) and written to embedded PostgreSQL; at each new-model coverage level the documents
outside a deterministic sample lose their new vector, an adapter is fitted on the pairs left,
and the 300 test queries are searched exactly, as each reader mode ranks:

- old only: the old model's column (what is served before the cutover);
- incremental: the new model's current vectors, plus the old model's for the documents lacking
  one (query embedded by each), merged by reciprocal rank fusion (today's reader reading the new model);
- parallel: both models' current vectors, merged by reciprocal rank fusion;
- bridged (procrustes / affine / chosen): the new model's current vectors, plus the old column
  searched with the new model's query carried there by the adapter, merged on calibrated scores;
- new at 100 %: the ceiling.

It prints nDCG@10 and Recall@100 for each, the pairs and seconds each fit took, and the held-out
retention that decides whether readers may use the adapter. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import ir_measures
import numpy as np
from ir_measures import R, nDCG
from psycopg import sql

os.environ.setdefault("TQDM_DISABLE", "1")  # as the CLI: no progress bars or load reports between the figures
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from segue.client.search import nearest, nearest_bridged, reciprocal_rank_fusion
from segue.control import registry
from segue.devtools import services
from segue.devtools.corpus import bundled_scifact, scifact_documents, store_embedded
from segue.devtools.modelkit import distill_static, minilm_path
from segue.embedding import adapters as maps
from segue.embedding.engine import EmbeddingEngine
from segue.settings import Settings, load_settings
from segue.storage import adapters, connections, model_columns, upgrades

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpnet import mpnet_path  # noqa: E402

COVERAGES = (0, 5, 10, 25, 50, 75, 100)
DEPTH = 100
CACHE = Path(tempfile.gettempdir()) / "segue-bench-bridged"


def embedded(engine: EmbeddingEngine, spec, texts: list[str], label: str) -> np.ndarray:
    """``texts`` embedded by ``spec``, from the cache when this run's texts were embedded before."""
    key = hashlib.sha256((spec.fingerprint + "\0" + "\0".join(texts)).encode()).hexdigest()[:16]
    path = CACHE / f"{label}-{key}.npy"
    if path.exists():
        return np.load(path)
    started = time.perf_counter()
    vectors = np.asarray(engine.embed_sync(spec, texts), dtype=np.float32)
    print(f"embedded {len(texts)} {label} texts with {spec.name} in {time.perf_counter() - started:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def covered_sample(doc_ids: list[str], pct: int) -> set[str]:
    """A deterministic ``pct`` % of ``doc_ids``, growing with ``pct`` (ordered by hash)."""
    ranked = sorted(doc_ids, key=lambda d: hashlib.md5(d.encode()).hexdigest())
    return set(ranked[: round(len(ranked) * pct / 100)])


def score(run: dict[str, list], qrels: list) -> tuple[float, float]:
    """(mean nDCG@10, mean Recall@100) of ``run`` (query id → hits, best first) over every judged query."""
    scored = [ir_measures.ScoredDoc(q, hit.doc_id, float(len(hits) - rank))
              for q, hits in run.items() for rank, hit in enumerate(hits)]
    values = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], qrels, scored)
    return values[nDCG @ 10], values[R @ 100]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=None, help="only the first N abstracts")
    parser.add_argument("--to", choices=["minilm", "mpnet"], default="minilm", help="the new model")
    args = parser.parse_args()
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="segue-bench-bridged-")), embedded_kafka_port=29093)
    url = services.database_url(settings)
    atexit.register(services.down, settings)  # the embedded services this run started end with it
    upgrades.upgrade(settings, url)
    static_dir = distill_static(str(minilm_path()), load_settings().data_dir / "models" / "minilm-static-256", dims=256)
    corpus = list(scifact_documents(args.docs))
    labelled = bundled_scifact()
    doc_ids = [d.doc_id for d in corpus]
    present = set(doc_ids)
    queries = [q for q in labelled.judged() if any(r > 0 and d in present for d, r in labelled.qrels[q].items())]
    qrels = [ir_measures.Qrel(q, d, r) for q in queries for d, r in labelled.qrels[q].items()]
    engine = EmbeddingEngine.from_settings(settings)
    try:
        with connections.connect(settings, url) as conn:
            if args.to == "minilm":
                old = registry.register_model(conn, "static-256", str(static_dir))
                new = registry.register_model(conn, "minilm", str(minilm_path()))
            else:
                old = registry.register_model(conn, "minilm", str(minilm_path()))
                new = registry.register_model(conn, "mpnet", str(mpnet_path()))
            docs = {spec: embedded(engine, spec, [d.text for d in corpus], "docs") for spec in (old, new)}
            query_vectors = {spec: dict(zip(queries, embedded(engine, spec, [labelled.queries[q] for q in queries],
                                                              "queries"))) for spec in (old, new)}
            store_embedded(conn, corpus, docs)
            print(f"SciFact: {len(corpus)} abstracts, {len(queries)} judged queries; {old.name} → {new.name}")
            run_levels(conn, old, new, doc_ids, queries, query_vectors, qrels)
    finally:
        engine.close()


def run_levels(conn, old, new, doc_ids, queries, query_vectors, qrels) -> None:
    """Print each mode's figures at each coverage level."""
    def ranked(spec, q, **kw):
        return nearest(conn, spec, query_vectors[spec][q], DEPTH, exact=True, **kw)

    old_only = score({q: ranked(old, q) for q in queries}, qrels)
    print("nDCG@10 / Recall@100 by mode; the adapters' held-out retention (chance-corrected) and fit time\n"
          f"{'coverage':>8} {'pairs':>6}  {'old only':>13} {'incremental':>13} {'parallel':>13} "
          f"{'bridged: procrustes':>19} {'affine':>13}  retention p / a   fit s p / a")
    for pct in COVERAGES:
        keep = covered_sample(doc_ids, pct)
        conn.execute(sql.SQL("UPDATE documents SET {h} = CASE WHEN doc_id = ANY(%s) THEN content_sha256 END").format(
            h=model_columns.sha_column(new.version)), (list(keep),))
        incremental = score({q: reciprocal_rank_fusion(
            [ranked(new, q), ranked(old, q, lacking=new)], DEPTH) for q in queries}, qrels)
        parallel = score({q: reciprocal_rank_fusion([ranked(old, q), ranked(new, q)], DEPTH) for q in queries}, qrels)
        figures, retention, seconds = {}, {}, {}
        new_pairs, old_pairs = adapters.pairs(conn, new.version, old.version, 20_000)
        if len(new_pairs) >= maps.MIN_PAIRS:
            for kind in maps.KINDS:
                started = time.perf_counter()
                fitted = maps.fit(new_pairs, old_pairs, kinds=(kind,))
                seconds[kind] = time.perf_counter() - started
                retention[kind] = fitted.retention
                figures[kind] = score({q: nearest_bridged(conn, new, old, fitted.space_map, query_vectors[new][q],
                                                          DEPTH, old_query=query_vectors[old][q], exact=True)
                                       for q in queries}, qrels)
        bridged = f"{cell(figures.get('procrustes')):>19} {cell(figures.get('affine'))}"
        fits = (f"{retention['procrustes']:.3f} / {retention['affine']:.3f}   "
                f"{seconds['procrustes']:.2f} / {seconds['affine']:.2f}" if figures else "")
        print(f"{pct:>7}% {len(new_pairs):>6}  {cell(old_only)} {cell(incremental)} {cell(parallel)} {bridged}  {fits}")
    print(f"new at 100 %: {cell(score({q: ranked(new, q) for q in queries}, qrels))}")


def cell(pair: tuple[float, float] | None) -> str:
    """nDCG@10 / Recall@100, or n/a."""
    return f"{pair[0]:.3f} / {pair[1]:.3f}" if pair else f"{'n/a':>13}"


if __name__ == "__main__":
    main()
