"""The ``model_adapters`` table: maps from a new model's space into an old one's, and the pairs they learn from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from segue.embedding.adapters import Fitted, SpaceMap
from segue.storage.model_columns import sha_column, vector_column


@dataclass(frozen=True)
class StoredAdapter:
    """One row of ``model_adapters``, its map loaded."""

    id: int
    new_version: int
    old_version: int
    new_fingerprint: str
    old_fingerprint: str
    pairs: int
    retention: float
    min_retention: float
    passed: bool
    held_out: dict[str, Any]
    space_map: SpaceMap
    fitted_at: datetime


def pairs(conn: psycopg.Connection, new_version: int, old_version: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of up to ``limit`` documents current in both models, a deterministic spread over doc_ids
    (ordered by their hash): (new, old)."""
    rows = conn.execute(
        sql.SQL("SELECT {nv}, {ov} FROM documents WHERE {nh} = content_sha256 AND {oh} = content_sha256"
                " ORDER BY md5(doc_id) LIMIT %s").format(
            nv=vector_column(new_version), ov=vector_column(old_version),
            nh=sha_column(new_version), oh=sha_column(old_version)),
        (limit,)).fetchall()
    if not rows:
        return np.empty((0, 0), dtype=np.float32), np.empty((0, 0), dtype=np.float32)
    return (np.stack([new.to_numpy() for new, _ in rows]).astype(np.float32),
            np.stack([old.to_numpy() for _, old in rows]).astype(np.float32))


def count_pairs(conn: psycopg.Connection, new_version: int, old_version: int) -> int:
    """How many documents are current in both models."""
    (count,) = conn.execute(
        sql.SQL("SELECT count(*) FROM documents WHERE {nh} = content_sha256 AND {oh} = content_sha256").format(
            nh=sha_column(new_version), oh=sha_column(old_version))).fetchone()
    return count


def insert(conn: psycopg.Connection, *, new_version: int, old_version: int, new_fingerprint: str,
           old_fingerprint: str, fitted: Fitted, min_retention: float) -> int:
    """Record a fitted adapter and whether it reached ``min_retention``; its id."""
    return conn.execute(
        "INSERT INTO model_adapters (new_version, old_version, new_fingerprint, old_fingerprint, kind, pairs,"
        " retention, min_retention, passed, held_out, weights)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (new_version, old_version, new_fingerprint, old_fingerprint, fitted.space_map.kind, fitted.pairs,
         fitted.retention, min_retention, fitted.retention >= min_retention,
         Jsonb(fitted.held_out), fitted.space_map.to_bytes()),
    ).fetchone()[0]


def latest_id(conn: psycopg.Connection, new_version: int, old_version: int) -> int | None:
    """The id of the adapter fitted last for the pair, passed or not."""
    row = conn.execute("SELECT max(id) FROM model_adapters WHERE new_version = %s AND old_version = %s",
                       (new_version, old_version)).fetchone()
    return row[0]


def latest_pairs(conn: psycopg.Connection, new_version: int, old_version: int) -> int:
    """The pairs the latest adapter of the pair was fitted on; 0 before the first."""
    row = conn.execute("SELECT pairs FROM model_adapters WHERE new_version = %s AND old_version = %s"
                       " ORDER BY id DESC LIMIT 1", (new_version, old_version)).fetchone()
    return row[0] if row else 0


def get(conn: psycopg.Connection, adapter_id: int) -> StoredAdapter | None:
    """Adapter ``adapter_id``, if it exists."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM model_adapters WHERE id = %s", (adapter_id,)).fetchone()
    return None if row is None else _stored(row)


def _stored(row: dict[str, Any]) -> StoredAdapter:
    return StoredAdapter(
        row["id"], row["new_version"], row["old_version"], row["new_fingerprint"], row["old_fingerprint"],
        row["pairs"], row["retention"], row["min_retention"], row["passed"], row["held_out"],
        SpaceMap.from_bytes(row["kind"], bytes(row["weights"])), row["fitted_at"])
