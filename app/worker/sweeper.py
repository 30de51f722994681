"""The sweeper: re-enqueues lost re-embeds, walking the corpus a slice at a time.

A vector can go missing for good: a backfill record lost with a broker, a change
written while a model was being registered, a first model registered over an existing
corpus. Each worker tick, one worker (by advisory lock) scans the next slice of
``documents`` per live model and publishes what should be current and is not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import psycopg

from segue.spec import ModelSpec
from segue.storage import documents
from segue.storage.documents import Store
from segue.storage.locks import Lock, take_for_transaction


async def sweep(
    store: Store,
    publish: Callable[[ModelSpec, list[str]], Awaitable[None]],
    *,
    max_age_s: float,
    scan_rows: int,
    retry_failed_after_s: float,
) -> dict[str, int]:
    """One sweeper step: ``publish`` each live model's lost re-embeds in the next slice of the corpus.

    Each model keeps a cursor in ``sweeper_progress`` and scans ``documents`` by primary
    key, ``scan_rows`` a step, so every document is looked at once a pass whatever the
    corpus size, and a new pass begins no sooner than ``max_age_s`` after the last one
    did. A document is published when its vector has been stale or missing for over
    ``max_age_s`` and it should be current: the model serves reads (readers need it
    whole, e.g. a first model registered over an existing corpus), or the document was
    written while the model was live, or it is behind the model's backfill watermark.
    Documents whose re-embed failed within ``retry_failed_after_s`` are skipped. The
    cursor moves only after ``publish`` returned, in one transaction with one sweeper
    at a time (advisory lock). Models with adopted vectors are skipped: nothing here can
    compute them. Returns {model name: documents published}.
    """
    conn = await store.connection()
    published: dict[str, int] = {}
    async with conn.transaction():
        async with conn.cursor() as cur:
            if not await take_for_transaction(cur, Lock.SWEEPER):
                return published
            for model in await store.computed_models():
                doc_ids = await _sweep_model(cur, model, max_age_s, scan_rows, retry_failed_after_s)
                if doc_ids:
                    await publish(model, doc_ids)
                    published[model.name] = len(doc_ids)
    return published


async def _sweep_model(cur: psycopg.AsyncCursor, model: ModelSpec, max_age_s: float, scan_rows: int,
                       retry_failed_after_s: float) -> list[str] | None:
    await cur.execute(
        "INSERT INTO sweeper_progress (model_version) VALUES (%s) ON CONFLICT (model_version) DO NOTHING",
        (model.version,),
    )
    await cur.execute(
        "SELECT cursor, passes > 0 AND cursor IS NULL AND pass_started_at > now() - make_interval(secs => %s)"
        " FROM sweeper_progress WHERE model_version = %s FOR UPDATE",
        (max_age_s, model.version),
    )
    after, resting = await cur.fetchone()
    if resting:
        return None
    scanned, last, doc_ids = await documents.lost_reembeds(cur, model.version, after=after, scan=scan_rows,
                                                           max_age_s=max_age_s, quiet_s=retry_failed_after_s)
    if scanned < scan_rows:  # the pass reached the end of the corpus
        await cur.execute(
            "UPDATE sweeper_progress SET cursor = NULL, passes = passes + 1, enqueued = enqueued + %s,"
            " updated_at = now(), pass_started_at = CASE WHEN cursor IS NULL THEN now() ELSE pass_started_at END"
            " WHERE model_version = %s",
            (len(doc_ids), model.version),
        )
    else:
        await cur.execute(
            "UPDATE sweeper_progress SET cursor = %s, enqueued = enqueued + %s, updated_at = now(),"
            " pass_started_at = CASE WHEN cursor IS NULL THEN now() ELSE pass_started_at END"
            " WHERE model_version = %s",
            (last, len(doc_ids), model.version),
        )
    return doc_ids
