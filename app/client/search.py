"""Ranking a model's column: the nearest current vectors to a query, and how rankings are checked and merged.

Shared by the reader (a service's searches) and the evaluation (a labelled set's
queries): both rank exactly the same way. Scores are cosine similarities
(``1 - (v <=> q)``); a query vector is only ever compared with the column of the model
that embedded it (:func:`check_query`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import psycopg

from segue.spec import ModelSpec
from segue.storage import documents

RRF_K = 60  # the reciprocal rank fusion constant: score = sum of 1 / (RRF_K + rank)


@dataclass(frozen=True)
class QueryVector:
    """A query the caller embedded: the vector, and the fingerprint of the model that embedded it."""

    vector: Any
    fingerprint: str


class IncompatibleQuery(ValueError):
    """A query vector that must not be compared with a model's column (wrong width or wrong model)."""


@dataclass(frozen=True)
class SearchHit:
    """One ranked document; ``model`` names the column(s) that ranked it, e.g. ``"new-tiny+old-static"``."""

    doc_id: str
    score: float
    body: str
    metadata: dict
    model: str


def check_query(spec: ModelSpec, vector: Any, fingerprint: str) -> np.ndarray:
    """``vector`` as float32 if it may be compared with ``spec``'s column; else raise :class:`IncompatibleQuery`.

    ``fingerprint`` is that of the model that embedded ``vector``; it must be the registry's.
    """
    query = np.asarray(vector.to_numpy() if hasattr(vector, "to_numpy") else vector, dtype=np.float32)
    if query.ndim != 1 or query.shape[0] != spec.dim:
        raise IncompatibleQuery(
            f"model {spec.name!r} (v{spec.version}) expects {spec.dim}-d query vectors, "
            f"got shape {'x'.join(map(str, query.shape)) or 'scalar'}"
        )
    if fingerprint != spec.fingerprint:
        raise IncompatibleQuery(
            f"model {spec.name!r} (v{spec.version}) has fingerprint {spec.fingerprint!r}, but the query vector "
            f"was embedded by a model with fingerprint {fingerprint!r}"
        )
    if not np.isfinite(query).all():
        raise IncompatibleQuery(f"the query vector for model {spec.name!r} contains NaN or infinite values")
    return query


def reciprocal_rank_fusion(rankings: Sequence[Sequence[SearchHit]], limit: int) -> list[SearchHit]:
    """Merge ranked lists: score = sum of 1 / (RRF_K + rank); ties broken by doc_id; top ``limit``."""
    scores: dict[str, float] = {}
    models: dict[str, set[str]] = {}
    first: dict[str, SearchHit] = {}
    for hits in rankings:
        for rank, hit in enumerate(hits, start=1):
            scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + 1.0 / (RRF_K + rank)
            models.setdefault(hit.doc_id, set()).add(hit.model)
            first.setdefault(hit.doc_id, hit)
    order = sorted(scores, key=lambda doc_id: (-scores[doc_id], doc_id))[:limit]
    return [replace(first[d], score=scores[d], model="+".join(sorted(models[d]))) for d in order]


def nearest(conn: psycopg.Connection, spec: ModelSpec, query: np.ndarray, k: int, *, filters: dict | None = None,
            lacking: ModelSpec | None = None, exact: bool = False) -> list[SearchHit]:
    """The ``k`` documents whose current ``spec`` vectors are nearest to ``query``, nearest first.

    ``filters`` keeps documents whose metadata contains it; ``lacking`` keeps documents
    without a current vector for that model (the reader's fallback). ``exact`` scans the
    column instead of using an HNSW index (the ground truth an index's recall is measured
    against); otherwise PostgreSQL may use the index, as readers do.
    """
    rows = documents.nearest(conn, spec.version, query, k, filters=filters,
                             lacking_version=lacking.version if lacking else None, exact=exact)
    return [SearchHit(doc_id, 1.0 - distance, body, metadata, spec.name) for doc_id, body, metadata, distance in rows]
