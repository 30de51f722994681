"""The registry's tables: ``embedding_models`` (one row per model version) and ``serving`` (the model readers query)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from segue.spec import ModelProfile, ModelSpec

SPEC_COLUMNS = [f.name for f in fields(ModelSpec)]


@dataclass(frozen=True)
class RegisteredModel:
    """A registry row: the spec plus its lifecycle state."""

    spec: ModelSpec
    state: str
    created_at: datetime
    serving_reads: bool


def _spec(row: dict) -> ModelSpec:
    """The spec of an ``embedding_models`` row (its other columns are lifecycle state)."""
    return ModelSpec(**{name: row[name] for name in SPEC_COLUMNS})


def list_models(conn: psycopg.Connection) -> list[RegisteredModel]:
    """Every registered model, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT m.*, s.read_model_version = m.version AS serving_reads"
            " FROM embedding_models m LEFT JOIN serving s ON true ORDER BY m.version"
        ).fetchall()
    return [RegisteredModel(_spec(r), r["state"], r["created_at"], bool(r["serving_reads"])) for r in rows]


async def specs_async(conn: psycopg.AsyncConnection, state: str) -> list[ModelSpec]:
    """The specs of the models in ``state`` (live or retired), oldest first (for the worker's async connections)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql.SQL("SELECT {} FROM embedding_models WHERE state = %s ORDER BY version").format(
            sql.SQL(", ").join(map(sql.Identifier, SPEC_COLUMNS))), (state,))
        return [_spec(row) for row in await cur.fetchall()]


def live_versions(conn: psycopg.Connection) -> list[int]:
    """Versions of the models that are not retired, oldest first."""
    rows = conn.execute("SELECT version FROM embedding_models WHERE state = 'live' ORDER BY version").fetchall()
    return [row[0] for row in rows]


def lock(conn: psycopg.Connection) -> None:
    """Hold the registry against other registrations until the transaction ends (versions are max + 1)."""
    conn.execute("LOCK TABLE embedding_models IN EXCLUSIVE MODE")


def name_taken(conn: psycopg.Connection, name: str) -> bool:
    """Whether a model (live or retired) is registered as ``name``."""
    return conn.execute("SELECT 1 FROM embedding_models WHERE name = %s", (name,)).fetchone() is not None


def next_version(conn: psycopg.Connection) -> int:
    """The version the next registered model gets."""
    return conn.execute("SELECT coalesce(max(version), 0) + 1 FROM embedding_models").fetchone()[0]


def insert(conn: psycopg.Connection, spec: ModelSpec) -> None:
    """Add ``spec``'s row, live; the first model registered also serves reads."""
    conn.execute(
        sql.SQL("INSERT INTO embedding_models ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, SPEC_COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(SPEC_COLUMNS)),
        ),
        [Jsonb(spec.config) if c == "config" else getattr(spec, c) for c in SPEC_COLUMNS],
    )
    conn.execute("INSERT INTO serving (read_model_version) VALUES (%s) ON CONFLICT (singleton) DO NOTHING",
                 (spec.version,))


def rebind(conn: psycopg.Connection, version: int, source: str, profile: ModelProfile, config: dict) -> None:
    """Make model ``version`` run by ``profile``'s provider from ``source`` (its column and name stay)."""
    conn.execute("UPDATE embedding_models SET provider = %s, source = %s, max_tokens = %s, config = %s,"
                 " fingerprint = %s WHERE version = %s",
                 (profile.provider, source, profile.max_tokens, Jsonb(config), profile.fingerprint, version))


def retire(conn: psycopg.Connection, version: int) -> None:
    """Mark model ``version`` retired: no longer written, its columns gone."""
    conn.execute("UPDATE embedding_models SET state = 'retired', retired_at = now() WHERE version = %s", (version,))


def serve_reads(conn: psycopg.Connection, version: int) -> None:
    """Make readers query model ``version``."""
    conn.execute("UPDATE serving SET read_model_version = %s, updated_at = now()", (version,))
