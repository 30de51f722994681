"""Bridging a migration: fit the adapter that lets readers use the new model before its column is complete.

The active migration's documents current in both models are the pairs; the adapter
(:mod:`segue.embedding.adapters`) carries a query embedded by the new model into the old
model's space. It passes when its held-out neighbour retention reaches
``SEGUE_ADAPTER_MIN_RETENTION``; readers (``bridged`` mode, and ``incremental`` reading the
new model) and ``segue eval --bridged`` only use the latest adapter of the pair, and only when
it passed and both models still have the fingerprints it was fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from segue.control import registry
from segue.embedding import adapters as maps
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import adapters, locks, migrations, model_columns


class BridgeRefused(RuntimeError):
    """No adapter may bridge the pair: none fitted, too few pairs, or the latest one's retention is too poor."""


@dataclass(frozen=True)
class Fit:
    """A fitted and recorded adapter, and its figures."""

    adapter_id: int
    fitted: maps.Fitted
    passed: bool
    min_retention: float


def migration_models(conn: psycopg.Connection) -> tuple[ModelSpec, ModelSpec]:
    """(new, old): the active migration's two models."""
    active = migrations.active(conn)
    if active is None:
        raise BridgeRefused("no migration is in progress: there is nothing to bridge")
    return registry.get_model(conn, active["to_name"]).spec, registry.get_model(conn, active["from_name"]).spec


def fit(conn: psycopg.Connection, settings: Settings, kinds: tuple[str, ...] = maps.DEFAULT_KINDS) -> Fit:
    """Fit an adapter from the active migration's new model to its old one on up to ``adapter_max_pairs``
    documents current in both (the best of ``kinds`` on held-out pairs), and record it (passed or not)."""
    new, old = migration_models(conn)
    new_vectors, old_vectors = adapters.pairs(conn, new.version, old.version, settings.adapter_max_pairs)
    try:
        fitted = maps.fit(new_vectors, old_vectors, kinds=kinds)
    except maps.AdapterError as error:
        raise BridgeRefused(f"cannot fit an adapter from {new.name} to {old.name}: {error} (let the migration "
                            "embed more documents with the new model, or run segue backfill)") from None
    adapter_id = adapters.insert(conn, new_version=new.version, old_version=old.version,
                                 new_fingerprint=new.fingerprint, old_fingerprint=old.fingerprint, fitted=fitted,
                                 min_retention=settings.adapter_min_retention)
    return Fit(adapter_id, fitted, fitted.retention >= settings.adapter_min_retention, settings.adapter_min_retention)


def refit_when_due(conn: psycopg.Connection, settings: Settings) -> Fit | None:
    """What workers do each tick: fit the active migration's adapter again once its new model has
    ``adapter_refit_every`` more current vectors than the latest adapter was fitted on (and that one used fewer
    than ``adapter_max_pairs``). None when not due, too few pairs yet, or another worker is fitting."""
    active = migrations.active(conn)
    if active is None or active["state"] == "paused" or settings.adapter_refit_every == 0:
        return None
    new_version, old_version = active["to_version"], active["from_version"]
    fitted_on = adapters.latest_pairs(conn, new_version, old_version)
    current, _ = model_columns.vector_counts(conn, new_version) or (0, 0)
    if fitted_on >= settings.adapter_max_pairs or current < max(fitted_on + settings.adapter_refit_every,
                                                                  maps.MIN_PAIRS):
        return None
    with locks.held_if_free(conn, locks.Lock.ADAPTER_FIT) as held:
        if not held or adapters.latest_pairs(conn, new_version, old_version) != fitted_on:
            return None
        try:
            return fit(conn, settings)
        except BridgeRefused:  # fewer pairs than current vectors (the old column lacks some): later
            return None


def usable(conn: psycopg.Connection, new: ModelSpec, old: ModelSpec, *,
           loaded: adapters.StoredAdapter | None = None) -> adapters.StoredAdapter:
    """The latest adapter bridging ``new`` to ``old`` (``loaded`` when it is still the latest: its weights are
    not read again); :class:`BridgeRefused`, with the figures, when it may not be used."""
    latest = adapters.latest_id(conn, new.version, old.version)
    if latest is None:
        raise BridgeRefused(f"no adapter from {new.name} to {old.name} yet: run segue adapter fit")
    adapter = loaded if loaded is not None and loaded.id == latest else adapters.get(conn, latest)
    if (adapter.new_fingerprint, adapter.old_fingerprint) != (new.fingerprint, old.fingerprint):
        raise BridgeRefused(f"adapter {adapter.id} was fitted for other weights of {new.name} or {old.name}: "
                            "run segue adapter fit again")
    if not adapter.passed:
        raise BridgeRefused(
            f"adapter {adapter.id} from {new.name} to {old.name} keeps {adapter.retention:.1%} of each document's "
            f"{maps.NEIGHBOURS} nearest neighbours on held-out pairs, below the {adapter.min_retention:.0%} it needs "
            f"({adapter.pairs} pairs; {describe_held_out(adapter.held_out)}): the two spaces are too far apart "
            "to bridge, so readers keep searching each model with its own query")
    return adapter


def describe(conn: psycopg.Connection, new: ModelSpec, old: ModelSpec) -> str:
    """Whether readers may bridge ``new`` to ``old`` now, and with which adapter, in one line."""
    try:
        adapter = usable(conn, new, old)
    except BridgeRefused as refusal:
        if adapters.latest_id(conn, new.version, old.version) is None:
            pairs = adapters.count_pairs(conn, new.version, old.version)
            return f"no adapter yet ({pairs} documents current in both models): segue adapter fit"
        return f"refused: {refusal}"
    return (f"adapter {adapter.id} ({adapter.space_map.kind}, {adapter.pairs} pairs, fitted "
            f"{adapter.fitted_at:%Y-%m-%d %H:%M}): held-out retention {adapter.retention:.1%} "
            f"≥ {adapter.min_retention:.0%}, readers may bridge")


def describe_held_out(held_out: dict[str, dict[str, float]]) -> str:
    """Each kind's held-out retention, in a few words."""
    return ", ".join(f"{kind} {figures['retention']:.1%}" for kind, figures in sorted(held_out.items()))
