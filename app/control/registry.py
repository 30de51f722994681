"""The model registry: ``embedding_models`` rows and the columns each model owns.

Registering a model inspects it (dim, pooling, fingerprint), adds its vector and
hash columns to ``documents`` and regenerates the counter triggers, all in one
transaction. Existing vector columns are never altered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from segue.embedding import providers
from segue.spec import ModelProfile, ModelSpec
from segue.storage import model_columns, upgrades

_SPEC_COLUMNS = [f.name for f in fields(ModelSpec)]


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out (duplicate name, unknown model, …)."""


@dataclass(frozen=True)
class RegisteredModel:
    """A registry row: the spec plus its lifecycle state."""

    spec: ModelSpec
    state: str
    created_at: datetime
    serving_reads: bool


def _spec(row: dict) -> ModelSpec:
    """The spec of an ``embedding_models`` row (its other columns are lifecycle state)."""
    return ModelSpec(**{name: row[name] for name in _SPEC_COLUMNS})


def list_models(conn: psycopg.Connection) -> list[RegisteredModel]:
    """Every registered model, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT m.*, s.read_model_version = m.version AS serving_reads"
            " FROM embedding_models m LEFT JOIN serving s ON true ORDER BY m.version"
        ).fetchall()
    return [RegisteredModel(_spec(r), r["state"], r["created_at"], bool(r["serving_reads"])) for r in rows]


def live_models(conn: psycopg.Connection) -> list[ModelSpec]:
    """The models every change is embedded with (all that are not retired)."""
    return [m.spec for m in list_models(conn) if m.state == "live"]


def get_model(conn: psycopg.Connection, name: str) -> RegisteredModel:
    """The registered model called ``name``."""
    for model in list_models(conn):
        if model.spec.name == name:
            return model
    raise RegistryError(f"no model named {name!r} is registered")


def register_model(conn: psycopg.Connection, name: str, source: str, *, provider: str | None = None,
                   options: dict | None = None, profile: ModelProfile | None = None) -> ModelSpec:
    """Register ``source`` as ``name``: a new version, its columns and its counters, in one transaction.

    The model is inspected by ``provider`` (default: detected from the source) with its
    ``options``, unless the caller passes the ``profile`` it already has. Inside an outer
    transaction the registration is part of it (and undone with it). The DDL waits for
    its locks at most briefly at a time (:func:`segue.storage.upgrades.run_ddl`), so writers never
    queue behind it for long.
    """
    profile = profile or providers.inspect(source, provider=provider, options=options)

    def register() -> ModelSpec:
        conn.execute("LOCK TABLE embedding_models IN EXCLUSIVE MODE")
        if conn.execute("SELECT 1 FROM embedding_models WHERE name = %s", (name,)).fetchone():
            raise RegistryError(f"a model named {name!r} is already registered")
        (version,) = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM embedding_models").fetchone()
        spec = ModelSpec.from_profile(version, name, source, profile)
        conn.execute(
            sql.SQL("INSERT INTO embedding_models ({}) VALUES ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, _SPEC_COLUMNS)),
                sql.SQL(", ").join(sql.Placeholder() * len(_SPEC_COLUMNS)),
            ),
            [Jsonb(spec.config) if c == "config" else getattr(spec, c) for c in _SPEC_COLUMNS],
        )
        conn.execute(
            sql.SQL("ALTER TABLE documents ADD COLUMN {} vector({}), ADD COLUMN {} bytea").format(
                model_columns.vector_column(version), sql.Literal(spec.dim), model_columns.sha_column(version)
            )
        )
        conn.execute("INSERT INTO vector_counters (model_version) VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO serving (read_model_version) VALUES (%s) ON CONFLICT (singleton) DO NOTHING", (version,)
        )
        model_columns.install_vector_counters(conn)
        return spec

    return upgrades.run_ddl(conn, register, what=f"registering model {name!r}")


BIND_SAMPLE = 64
BIND_MIN_COSINE = 0.999


def require_embedded(spec: ModelSpec) -> None:
    """Refuse (RegistryError, naming the way out) a model Segue cannot embed with: adopted vectors."""
    if not providers.embeds(spec):
        raise RegistryError(f"model {spec.name!r} holds adopted vectors and Segue cannot embed with it: "
                            f"bind it first (segue models bind {spec.name} --source …)")


def bind_model(conn: psycopg.Connection, engine, name: str, source: str, *, provider: str | None = None,
               options: dict | None = None) -> tuple[ModelSpec, float]:
    """Bind adopted model ``name`` to a provider that reproduces its stored vectors; (the new spec, min cosine).

    The provider embeds a sample of documents whose adopted vector is current; every one
    must reach a cosine of ``BIND_MIN_COSINE`` with the stored vector, or nothing changes.
    From then on workers embed changes with it, in the same column.
    """
    adopted = get_model(conn, name).spec
    if providers.embeds(adopted):
        raise RegistryError(f"model {name!r} is run by provider {adopted.provider!r}; only adopted models are bound")
    profile = providers.inspect(source, provider=provider, options=options)
    if profile.dim != adopted.dim:
        raise RegistryError(f"{source} makes {profile.dim}-d vectors; model {name!r} holds {adopted.dim}-d ones")
    rows = conn.execute(
        sql.SQL("SELECT body, {v} FROM documents WHERE {h} = content_sha256 ORDER BY doc_id LIMIT %s").format(
            v=model_columns.vector_column(adopted.version), h=model_columns.sha_column(adopted.version)), (BIND_SAMPLE,)).fetchall()
    if not rows:
        raise RegistryError(f"model {name!r} has no current vector to check the provider against")
    bound = ModelSpec.from_profile(adopted.version, name, source, profile)
    computed = engine.embed_counted_sync(bound, [body for body, _ in rows])
    stored = np.stack([vector.to_numpy() for _, vector in rows])
    stored = stored / np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
    if computed.rejected:
        raise RegistryError(f"{source} does not reproduce model {name!r}'s stored vectors: it gives no usable vector "
                            f"for one of {len(rows)} documents ({min(computed.rejected.items())[1]})")
    cosine = float((computed.vectors * stored).sum(axis=1).min())
    if not cosine >= BIND_MIN_COSINE:  # NaN fails too
        raise RegistryError(f"{source} does not reproduce model {name!r}'s stored vectors: the lowest cosine over "
                            f"{len(rows)} documents is {cosine:.4f} < {BIND_MIN_COSINE}")
    config = {**profile.config, "adopted_from": adopted.config.get("source")}
    conn.execute("UPDATE embedding_models SET provider = %s, source = %s, max_tokens = %s, config = %s,"
                 " fingerprint = %s WHERE version = %s",
                 (profile.provider, source, profile.max_tokens, Jsonb(config), profile.fingerprint, adopted.version))
    return get_model(conn, name).spec, cosine
