"""The model registry: registering, finding and binding models (the SQL lives in :mod:`segue.storage.registry`).

Registering a model inspects it (dim, pooling, fingerprint), records it, adds its vector
and hash columns to ``documents`` and regenerates the counter triggers, all in one
transaction. Existing vector columns are never altered.
"""

from __future__ import annotations

import logging

import numpy as np
import psycopg

from segue.embedding import providers
from segue.spec import ModelProfile, ModelSpec
from segue.storage import chunks, documents, model_columns, upgrades
from segue.storage import registry as storage_registry
from segue.storage.registry import RegisteredModel

log = logging.getLogger("segue.control.registry")


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out (duplicate name, unknown model, …)."""


def list_models(conn: psycopg.Connection) -> list[RegisteredModel]:
    """Every registered model, oldest first."""
    return storage_registry.list_models(conn)


def live_models(conn: psycopg.Connection) -> list[ModelSpec]:
    """The models every change is embedded with (all that are not retired)."""
    return [m.spec for m in list_models(conn) if m.state == "live"]


def get_model(conn: psycopg.Connection, name: str) -> RegisteredModel:
    """The registered model called ``name``."""
    for model in list_models(conn):
        if model.spec.name == name:
            return model
    raise RegistryError(f"no model named {name!r} is registered (segue models list shows those that are): register "
                        f"it with segue models add {name} --source …, or give migrate plan/start --source")


def register_model(conn: psycopg.Connection, name: str, source: str, *, provider: str | None = None,
                   options: dict | None = None, chunking: dict | None = None,
                   profile: ModelProfile | None = None) -> ModelSpec:
    """Register ``source`` as ``name``: a new version, its columns (and chunk table) and its counters, in one
    transaction.

    The model is inspected by ``provider`` (default: detected from the source) with its
    ``options`` and ``chunking`` policy, unless the caller passes the ``profile`` it already has. Inside an outer
    transaction the registration is part of it (and undone with it). The DDL waits for
    its locks at most briefly at a time (:func:`segue.storage.upgrades.run_ddl`), so writers never
    queue behind it for long.
    """
    profile = profile or providers.inspect(source, provider=provider, options=options, chunking=chunking)

    def register() -> ModelSpec:
        storage_registry.lock(conn)
        if storage_registry.name_taken(conn, name):
            raise RegistryError(f"a model named {name!r} is already registered")
        spec = ModelSpec.from_profile(storage_registry.next_version(conn), name, source, profile)
        twins = [m.spec for m in storage_registry.list_models(conn)
                 if m.state == "live" and m.spec.fingerprint == spec.fingerprint]
        for twin in twins:
            log.warning("model %r has the fingerprint of live model %r (v%d): both would hold the same vectors, "
                        "embedded twice; use %r instead (this registration goes on)", name, twin.name, twin.version,
                        twin.name)
        storage_registry.insert(conn, spec)
        model_columns.add(conn, spec.version, spec.dim)
        if spec.chunked:
            chunks.create(conn, spec.version, spec.dim)
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
    if adopted.chunked:
        raise RegistryError(f"model {name!r} holds adopted chunks, cut by a splitter Segue does not know: it cannot "
                            "be bound; migrate to a chunked model instead (segue migrate start --to NEW --source … "
                            "--chunk-size N)")
    profile = providers.inspect(source, provider=provider, options=options)
    if profile.dim != adopted.dim:
        raise RegistryError(f"{source} makes {profile.dim}-d vectors; model {name!r} holds {adopted.dim}-d ones")
    rows = documents.current_sample(conn, adopted.version, BIND_SAMPLE)
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
    storage_registry.rebind(conn, adopted.version, source, profile, config)
    return get_model(conn, name).spec, cosine
