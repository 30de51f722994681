"""Shadow queries, for when there are no labels: readers log a sample of real queries; ``segue eval --shadow``
replays them on both models; the ``query_drift`` view watches them over time.

A shadow comparison is evidence next to a labelled verdict, not a verdict: how much the
two models' top 10 agree (overlap@10, rank-biased overlap) and how similar their best
hits are (the distribution of top-1 cosine similarities).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np
import psycopg

from segue.client.search import SearchHit, nearest
from segue.embedding.engine import EmbeddingEngine
from segue.spec import ModelSpec
from segue.storage import migrations

RBO_PERSISTENCE = 0.9  # the weight rank-biased overlap gives each next rank
TOP_K = 10


class QueryLog:
    """Logs a sample of a reader's queries in ``query_log``: a ``rate`` share, text kept or only hashed."""

    def __init__(self, *, rate: float, keep_text: bool, low_score: float):
        if not 0 <= rate <= 1:
            raise ValueError(f"the query log rate is a share between 0 and 1, not {rate}")
        self.rate = rate
        self.keep_text = keep_text
        self.low_score = low_score
        self._random = random.Random()

    def sampled(self) -> bool:
        """Whether to log the next query."""
        return self.rate > 0 and self._random.random() < self.rate

    def record(self, conn: psycopg.Connection, spec: ModelSpec, text: str, vector: np.ndarray,
               hits: Sequence[SearchHit]) -> None:
        """Log one query: the read model's vector and its best hits (the text if kept)."""
        top1 = hits[0].score if hits else None
        conn.execute(
            "INSERT INTO query_log (model_version, query_text, query_sha256, query_vector, top1_score, low_score,"
            " result_ids) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (spec.version, text if self.keep_text else None, hashlib.sha256(text.encode()).digest(), vector, top1,
             top1 is None or top1 < self.low_score, [hit.doc_id for hit in hits]),
        )


def purge(conn: psycopg.Connection, *, retention_days: float) -> int:
    """Delete logged queries older than the retention; how many went."""
    return conn.execute("DELETE FROM query_log WHERE at < now() - make_interval(secs => %s)",
                        (retention_days * 86400,)).rowcount


def rank_biased_overlap(left: Sequence[str], right: Sequence[str], persistence: float = RBO_PERSISTENCE) -> float:
    """Extrapolated rank-biased overlap of two rankings of the same depth (Webber, Moffat & Zobel, 2010):
    1 for identical rankings, 0 for disjoint ones, weighting agreement at the top."""
    depth = min(len(left), len(right))
    if depth == 0:
        return 0.0
    agreement = 0.0
    for k in range(1, depth + 1):
        agreement += len(set(left[:k]) & set(right[:k])) / k * persistence ** k
    overlap = len(set(left[:depth]) & set(right[:depth]))
    return overlap / depth * persistence ** depth + (1 - persistence) / persistence * agreement


def compare(conn: psycopg.Connection, engine: EmbeddingEngine, old: ModelSpec, new: ModelSpec, *,
            limit: int) -> dict:
    """Replay the latest ``limit`` logged queries that kept their text on both models; the figures."""
    rows = conn.execute("SELECT query_text FROM query_log WHERE query_text IS NOT NULL ORDER BY at DESC LIMIT %s",
                        (limit,)).fetchall()
    (hashed,) = conn.execute("SELECT count(*) FROM query_log WHERE query_text IS NULL").fetchone()
    texts = [text for (text,) in rows]
    if not texts:
        return {"kind": "shadow", "queries": 0, "without_text": hashed}
    embedded = {spec.name: engine.embed_counted_sync(spec, texts) for spec in (old, new)}
    usable = [i for i in range(len(texts)) if not any(i in e.rejected for e in embedded.values())]
    rankings = {spec.name: [nearest(conn, spec, embedded[spec.name].vectors[i], TOP_K, exact=True) for i in usable]
                for spec in (old, new)}
    overlaps, rbos = [], []
    for old_hits, new_hits in zip(rankings[old.name], rankings[new.name]):
        left, right = [h.doc_id for h in old_hits], [h.doc_id for h in new_hits]
        overlaps.append(len(set(left) & set(right)) / TOP_K)
        rbos.append(rank_biased_overlap(left, right))
    top1 = {side: [hits[0].score if hits else None for hits in rankings[spec.name]]
            for side, spec in (("old", old), ("new", new))}
    return {"kind": "shadow", "queries": len(usable), "without_text": hashed, "rejected": len(texts) - len(usable),
            "old_model": old.name,
            "new_model": new.name, "overlap_at_10": float(np.mean(overlaps)), "rbo": float(np.mean(rbos)),
            "per_query": {"overlap_at_10": overlaps, "rbo": rbos}, "top1": top1,
            "top1_quantiles": {side: _quantiles(values) for side, values in top1.items()}}


def store(conn: psycopg.Connection, result: dict, old: ModelSpec, new: ModelSpec, migration_id: int | None) -> int:
    """Record a shadow comparison as evidence (no verdict)."""
    return migrations.record_shadow(conn, migration_id=migration_id, old_version=old.version, new_version=new.version,
                                    metric="overlap@10", new_value=result.get("overlap_at_10"), detail=result)


def drifting(conn: psycopg.Connection, *, max_shift: float) -> list[tuple]:
    """(model, day, centroid shift) of each read model whose latest logged day moved past ``max_shift``."""
    latest = conn.execute("SELECT DISTINCT ON (model_version) model, day, centroid_shift FROM query_drift"
                          " ORDER BY model_version, day DESC").fetchall()
    return [row for row in latest if row[2] is not None and row[2] > max_shift]


def _quantiles(values: list[float | None]) -> dict[str, float]:
    present = np.array([v for v in values if v is not None], dtype=float)
    if not len(present):
        return {}
    return {f"p{q}": float(np.percentile(present, q)) for q in (5, 25, 50, 75, 95)}
