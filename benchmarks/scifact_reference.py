"""Reference nDCG@10 on the bundled SciFact set, computed without Segue: sentence-transformers and model2vec
encode, numpy exact search, ir-measures scores.

    python benchmarks/scifact_reference.py                 # all 5,183 abstracts, 300 queries
    python benchmarks/scifact_reference.py --docs 600      # the subset tests/quality/test_eval.py pins

The static model is all-MiniLM-L6-v2 distilled by model2vec to 256 dims (as the demo does; cached under
the Segue data dir). Only queries with a judged document among the first --docs abstracts count.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ir_measures
import numpy as np
from ir_measures import nDCG

from segue.devtools.corpus import bundled_scifact, scifact_documents
from segue.devtools.modelkit import distill_static, minilm_path
from segue.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=None)
    parser.add_argument("--static-dir", type=Path, default=load_settings().data_dir / "models" / "minilm-static-256")
    args = parser.parse_args()
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

    corpus = list(scifact_documents(args.docs))
    ids = [d.doc_id for d in corpus]
    labelled = bundled_scifact()
    qids = [q for q in labelled.judged() if set(labelled.qrels[q]) & set(ids)]
    queries = labelled.queries
    judged = [ir_measures.Qrel(q, d, r) for q in qids for d, r in labelled.qrels[q].items()]
    models = {
        "all-MiniLM-L6-v2": SentenceTransformer(str(minilm_path()), device="cpu").encode,
        "minilm-static-256": StaticModel.from_pretrained(distill_static(str(minilm_path()), args.static_dir, dims=256)).encode,
    }
    print(f"{len(corpus)} abstracts, {len(qids)} queries with a judged abstract among them")
    for name, encode in models.items():
        started = time.perf_counter()
        docs = _unit(encode([d.text for d in corpus]))
        query_vectors = _unit(encode([queries[q] for q in qids]))
        run = [ir_measures.ScoredDoc(q, ids[i], float(score))
               for q, scores in zip(qids, query_vectors @ docs.T)
               for i in np.argsort(-scores)[:100] for score in [scores[i]]]
        figure = ir_measures.calc_aggregate([nDCG @ 10], judged, run)[nDCG @ 10]
        print(f"{name}: nDCG@10 {figure:.4f} ({time.perf_counter() - started:.0f} s)")


def _unit(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


if __name__ == "__main__":
    main()
