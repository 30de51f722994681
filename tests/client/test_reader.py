"""The reader client against real services: embedded PostgreSQL, Tansu, a worker subprocess, tiny real models.

Documents are written through Kafka and the worker; a migration is a ``migrations`` row
inserted (and removed) by the test itself. Each test tags its documents with a unique
``suite`` metadata value and filters on it, so other tests' documents never rank.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import contextmanager

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from psycopg import sql

from segue.client.reader import SegueReader, route_by_query_shape
from segue.client.search import (
    RRF_K,
    IncompatibleQuery,
    SearchHit,
    check_query,
    reciprocal_rank_fusion,
)
from segue.control import registry
from segue.embedding import providers
from segue.embedding.engine import EmbeddingEngine
from segue.spec import ModelSpec
from segue.storage import connections, model_columns
from tests.conftest import NEW, OLD
from tests.harness import change, wait_for

TEXTS = [
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The mitochondria produce most of the chemical energy that powers a cell.",
    "Kafka partitions a topic so that consumers in a group can share the work.",
    "PostgreSQL uses multiversion concurrency control instead of read locks.",
    "A transformer encoder maps a sentence to one vector by pooling its tokens.",
    "Glaciers carve U-shaped valleys as they slowly flow downhill.",
    "Sourdough bread rises because wild yeast ferments the dough.",
    "The French Revolution began in 1789 with the storming of the Bastille.",
]
BOTH = "+".join(sorted([OLD, NEW]))


# -- helpers ------------------------------------------------------------------------------------

def models(harness) -> dict[str, ModelSpec]:
    with connections.connect(harness.settings, harness.database_url) as conn:
        return {spec.name: spec for spec in registry.live_models(conn)}


def current_count(harness, doc_ids: list[str], spec: ModelSpec) -> int:
    return harness.scalar(
        sql.SQL("SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND {} = content_sha256").format(
            model_columns.sha_column(spec.version)),
        (doc_ids,),
    )


def add_documents(harness, texts: list[str]) -> tuple[str, list[str]]:
    """Write ``texts`` through Kafka under a fresh suite tag; wait until both models' vectors are current."""
    suite = uuid.uuid4().hex
    ids = [f"rd-{suite[:8]}-{n}" for n in range(len(texts))]
    harness.publish_changes([(i, change(i, t, 1, metadata={"suite": suite})) for i, t in zip(ids, texts)])
    specs = models(harness)
    wait_for(lambda: all(current_count(harness, ids, specs[m]) == len(ids) for m in (OLD, NEW)),
             what="the suite's documents to be dual-written")
    return suite, ids


def drop_vectors(harness, doc_ids: list[str], spec: ModelSpec) -> None:
    """Simulate documents lacking a current vector for ``spec``."""
    harness.conn.execute(
        sql.SQL("UPDATE documents SET {} = NULL, {} = NULL WHERE doc_id = ANY(%s)").format(
            model_columns.vector_column(spec.version), model_columns.sha_column(spec.version)),
        (doc_ids,),
    )


def repair(harness, doc_ids: list[str], spec: ModelSpec) -> None:
    """Have the worker re-embed ``doc_ids`` for ``spec`` (cleanup for tests that dropped vectors)."""
    harness.publish_read_misses([(i, orjson.dumps({"doc_id": i, "model": spec.name})) for i in doc_ids])
    wait_for(lambda: current_count(harness, doc_ids, spec) == len(doc_ids), what="vectors to be repaired")


@contextmanager
def migration(harness, from_spec: ModelSpec, to_spec: ModelSpec, state: str = "running"):
    """An active migration row for the duration of the block."""
    active = harness.sql("SELECT id, from_version, to_version, state FROM migrations WHERE state <> 'finished'")
    assert not active, f"another test left a migration active: {active}"
    (migration_id,) = harness.sql(
        "INSERT INTO migrations (from_version, to_version, state) VALUES (%s, %s, %s) RETURNING id",
        (from_spec.version, to_spec.version, state),
    )[0]
    try:
        yield migration_id
    finally:
        harness.conn.execute("DELETE FROM migrations WHERE id = %s", (migration_id,))


@contextmanager
def serving(harness, spec: ModelSpec):
    """``spec`` serves reads for the duration of the block."""
    before = harness.scalar("SELECT read_model_version FROM serving")
    harness.conn.execute("UPDATE serving SET read_model_version = %s", (spec.version,))
    try:
        yield
    finally:
        harness.conn.execute("UPDATE serving SET read_model_version = %s", (before,))


def read_miss_events(harness) -> list[tuple[str, dict]]:
    """Every (key, value) on the read-misses topic so far."""

    async def read() -> list[tuple[str, dict]]:
        consumer = AIOKafkaConsumer(
            harness.settings.topic_read_misses, bootstrap_servers=harness.bootstrap,
            auto_offset_reset="earliest", enable_auto_commit=False,
        )
        await consumer.start()
        try:
            records, batches = [], await consumer.getmany(timeout_ms=1500)
            while batches:
                records += [r for batch in batches.values() for r in batch]
                batches = await consumer.getmany(timeout_ms=500)
            # Other test files sharing the session's broker put hostile records on the topic: skip what is not JSON.
            return [(r.key.decode(errors="replace") if r.key else None, value) for r in records
                    if (value := _json_or_none(r.value)) is not None]
        finally:
            await consumer.stop()

    return asyncio.run(read())


def _json_or_none(value: bytes | None) -> object | None:
    try:
        return orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return None


def events_for(harness, doc_ids: list[str]) -> list[dict]:
    return [value for key, value in read_miss_events(harness) if key in doc_ids]


@pytest.fixture(scope="module")
def corpus(harness, worker) -> tuple[str, list[str]]:
    """A suite of documents with current vectors for both models (never modified by the tests)."""
    return add_documents(harness, TEXTS)


def reader_for(harness, engine, **options) -> SegueReader:
    return SegueReader(harness.settings, database_url=harness.database_url, engine=engine, **options)


# -- pure functions -----------------------------------------------------------------------------

def spec(name: str, dim: int, version: int) -> ModelSpec:
    return ModelSpec(version=version, name=name, provider="static", source=f"/models/{name}", dim=dim, max_tokens=128,
                     config={}, fingerprint=f"fp-{name}")


def test_route_by_query_shape():
    read, light = spec("read-big", 64, 2), spec("light", 16, 1)
    candidates = [read, light]
    assert route_by_query_shape("reset my password", candidates) is light
    assert route_by_query_shape("how do I reset my password on the mobile app?", candidates) is light
    assert route_by_query_shape("how do I reset my password on the mobile app today", candidates) is read
    long_question = "why does the password reset email never arrive when I use the corporate single sign on?"
    assert route_by_query_shape(long_question, candidates) is read
    assert route_by_query_shape("reset my password", [read]) is read


def test_reciprocal_rank_fusion_merges_and_breaks_ties_by_doc_id():
    def hits(model: str, ids: str) -> list[SearchHit]:
        return [SearchHit(i, 0.5, f"body {i}", {}, model) for i in ids]

    fused = reciprocal_rank_fusion([hits("b-model", "xyz"), hits("a-model", "yxw")], limit=3)
    assert [h.doc_id for h in fused] == ["x", "y", "w"]  # x, y in both (tied: doc_id), then w before z
    assert [h.model for h in fused] == ["a-model+b-model", "a-model+b-model", "a-model"]
    assert fused[0].score == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 2))
    assert fused[2].score == pytest.approx(1 / (RRF_K + 3))


def test_check_query_rejects_wrong_dim_and_fingerprint():
    model = spec("checked", 4, 7)
    assert check_query(model, [1.0, 0.0, 0.0, 0.0], "fp-checked").dtype.name == "float32"
    with pytest.raises(IncompatibleQuery, match=r"'checked'.*4-d.*got shape 3"):
        check_query(model, [1.0, 0.0, 0.0], "fp-checked")
    with pytest.raises(IncompatibleQuery, match=r"'checked'.*'fp-checked'.*'fp-other'"):
        check_query(model, [1.0, 0.0, 0.0, 0.0], "fp-other")
    with pytest.raises(IncompatibleQuery, match="NaN"):
        check_query(model, [float("nan"), 0.0, 0.0, 0.0], "fp-checked")


# -- against the services -----------------------------------------------------------------------

def test_incremental_falls_back_and_publishes_deduplicated_read_misses(harness, worker, engine):
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    suite, ids = add_documents(harness, TEXTS)
    lacking = ids[:3]
    drop_vectors(harness, lacking, old)
    reader = reader_for(harness, engine)
    try:
        with migration(harness, old, new):
            assert harness.scalar("SELECT read_model_version FROM serving") == old.version
            result = reader.search("energy in living cells", k=10, filters={"suite": suite})
            assert result.mode == "incremental" and result.models == (OLD, NEW)
            assert sorted(h.doc_id for h in result.hits) == sorted(ids)
            assert {h.doc_id: h.model for h in result.hits} == {i: NEW if i in lacking else OLD for i in ids}
            assert result.hits[0].score == pytest.approx(1 / (RRF_K + 1))  # fused scores
            assert sorted(result.read_misses) == sorted(lacking)

            # The same query again, within the dedup window: nothing new is published.
            assert reader.search("energy in living cells", k=10, filters={"suite": suite}).read_misses == []

            events = wait_for(lambda: len(found := events_for(harness, ids)) >= 3 and found,
                              what="the read misses on the topic")
            assert sorted(e["doc_id"] for e in events) == sorted(lacking)
            assert {e["model"] for e in events} == {OLD} and all(e["event_id"] for e in events)
            wait_for(lambda: current_count(harness, lacking, old) == 3, what="the worker to repair the vectors")
            after = reader.search("energy in living cells", k=10, filters={"suite": suite})
            assert {h.model for h in after.hits} == {OLD} and after.read_misses == []

            # Lacking again, still within the window: found by the fallback, not published again.
            drop_vectors(harness, lacking, old)
            again = reader.search("energy in living cells", k=10, filters={"suite": suite})
            assert {h.doc_id for h in again.hits if h.model == NEW} == set(lacking)
            assert again.read_misses == []
            assert reader.read_miss_stats["deduplicated"] >= 3
        reader.close()
        assert reader.read_miss_stats["published"] == 3
        assert len(events_for(harness, ids)) == 3
        # Without an active migration there is no fallback: the lacking documents are not found.
        plain = reader_for(harness, engine)
        try:
            result = plain.search("energy in living cells", k=10, filters={"suite": suite})
            assert result.models == (OLD,) and sorted(h.doc_id for h in result.hits) == sorted(ids[3:])
            assert all(-1.0 <= h.score <= 1.0 for h in result.hits)
        finally:
            plain.close()
    finally:
        reader.close()
        repair(harness, lacking, old)


def test_parallel_merges_both_columns_deterministically(harness, worker, engine, corpus):
    suite, ids = corpus
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    query = "how do cells get their energy"

    def expected(k: int) -> list[tuple[str, float, str]]:
        scores: dict[str, float] = {}
        names: dict[str, set[str]] = {}
        with reader_for(harness, engine) as single:
            for s in (old, new):
                vector = engine.embed_sync(s, [query])[0]
                hits = single.search_vector(vector, s.name, fingerprint=s.fingerprint, k=k, filters={"suite": suite})
                for rank, hit in enumerate(hits.hits, start=1):
                    scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + 1 / (60 + rank)
                    names.setdefault(hit.doc_id, set()).add(hit.model)
        order = sorted(scores, key=lambda d: (-scores[d], d))[:k]
        return [(d, pytest.approx(scores[d]), "+".join(sorted(names[d]))) for d in order]

    with migration(harness, old, new), reader_for(harness, engine, mode="parallel") as reader:
        full = reader.search(query, k=len(ids), filters={"suite": suite})
        assert full.mode == "parallel" and full.models == (OLD, NEW) and full.read_misses == []
        assert {h.model for h in full.hits} == {BOTH} and sorted(h.doc_id for h in full.hits) == sorted(ids)
        assert [(h.doc_id, h.score, h.model) for h in full.hits] == expected(len(ids))

        top = reader.search(query, k=3, filters={"suite": suite})
        assert [(h.doc_id, h.score, h.model) for h in top.hits] == expected(3)
        assert all(h.body in TEXTS and h.metadata == {"suite": suite} for h in top.hits)
        with reader_for(harness, engine) as other_reader:
            for results in ([reader.search(query, k=3, filters={"suite": suite}) for _ in range(3)]
                            + [other_reader.search(query, k=3, filters={"suite": suite}, mode="parallel")]):
                assert results.hits == top.hits

    with reader_for(harness, engine, mode="parallel") as reader:  # no migration: the read model alone
        alone = reader.search(query, k=3, filters={"suite": suite})
        assert alone.models == (OLD,) and {h.model for h in alone.hits} == {OLD}


def test_routing_sends_short_queries_to_the_lighter_model(harness, worker, engine, corpus):
    suite, _ = corpus
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    assert old.dim < new.dim
    faq = "what is photosynthesis?"
    long_query = "explain in detail how plants convert sunlight water and carbon dioxide into sugar over a day"
    with migration(harness, old, new, state="cut_over"), serving(harness, new):
        with reader_for(harness, engine, mode="routing") as reader:
            short = reader.search(faq, k=3, filters={"suite": suite})
            assert short.mode == "routing" and short.models == (OLD,) and {h.model for h in short.hits} == {OLD}
            long = reader.search(long_query, k=3, filters={"suite": suite})
            assert long.models == (NEW,) and {h.model for h in long.hits} == {NEW}

        seen = []

        def heaviest(text: str, candidates: list[ModelSpec]) -> ModelSpec:
            seen.append((text, [c.name for c in candidates]))
            return max(candidates, key=lambda c: c.dim)

        with reader_for(harness, engine, mode="routing", routing_policy=heaviest) as reader:
            assert reader.search(faq, k=3, filters={"suite": suite}).models == (NEW,)
            assert seen == [(faq, [NEW, OLD])]  # the read model first
        with reader_for(harness, engine, mode="routing", routing_policy=lambda t, c: spec("stranger", 8, 99)) as reader:
            with pytest.raises(ValueError, match="stranger"):
                reader.search(faq, filters={"suite": suite})

    with reader_for(harness, engine, mode="routing") as reader:  # no migration: the read model is the only choice
        assert reader.search(faq, k=3, filters={"suite": suite}).models == (OLD,)


def test_routing_goes_to_the_lighter_model_only_once_its_column_is_complete(harness, worker, engine):
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    suite, ids = add_documents(harness, TEXTS)
    covered, lacking = ids[:2], ids[2:]
    faq = "what is photosynthesis?"
    drop_vectors(harness, lacking, old)  # the lighter model's column is current for two documents only
    try:
        with reader_for(harness, engine, mode="routing", serving_ttl_s=0, read_miss_rate=0) as reader:
            with migration(harness, new, old), serving(harness, new):  # migrating to the lighter model
                result = reader.search(faq, k=len(ids), filters={"suite": suite})
                assert result.models == (NEW,) and sorted(h.doc_id for h in result.hits) == sorted(ids)
            with migration(harness, old, new):  # the read model lacks vectors: searched with incremental's fallback
                result = reader.search(faq, k=len(ids), filters={"suite": suite})
                assert result.mode == "routing" and result.models == (OLD, NEW)
                assert {h.doc_id: h.model for h in result.hits} == {i: OLD if i in covered else NEW for i in ids}
    finally:
        repair(harness, lacking, old)
    with migration(harness, new, old), serving(harness, new), reader_for(harness, engine, mode="routing") as reader:
        result = reader.search(faq, k=len(ids), filters={"suite": suite})
        assert result.models == (OLD,) and sorted(h.doc_id for h in result.hits) == sorted(ids)


def test_search_vector_guards_dim_and_fingerprint(harness, worker, engine, corpus):
    suite, ids = corpus
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    text = TEXTS[3]
    with reader_for(harness, engine) as reader:
        for s in (old, new):
            vector = engine.embed_sync(s, [text])[0]
            result = reader.search_vector(vector, s.name, fingerprint=s.fingerprint, k=3, filters={"suite": suite})
            assert result.models == (s.name,) and result.hits[0].doc_id == ids[3]
            assert result.hits[0].score == pytest.approx(1.0, abs=1e-3) and result.hits[0].model == s.name

        new_vector = engine.embed_sync(new, [text])[0]
        with pytest.raises(IncompatibleQuery, match=rf"'{NEW}'.*{new.dim}-d.*got shape {new.dim - 1}"):
            reader.search_vector(new_vector[:-1], NEW, fingerprint=new.fingerprint)
        with pytest.raises(IncompatibleQuery, match=rf"'{NEW}'.*{new.fingerprint}.*deadbeef"):
            reader.search_vector(new_vector, NEW, fingerprint="deadbeef")
        old_vector = engine.embed_sync(old, [text])[0]  # the old model's vector for the new column
        with pytest.raises(IncompatibleQuery, match=rf"'{NEW}'.*{new.dim}-d.*got shape {old.dim}"):
            reader.search_vector(old_vector, NEW, fingerprint=old.fingerprint)
        with pytest.raises(IncompatibleQuery, match=rf"'{NEW}'.*{new.fingerprint}.*{old.fingerprint}"):
            reader.search_vector(new_vector, NEW, fingerprint=old.fingerprint)  # right width, wrong model
        with pytest.raises(IncompatibleQuery, match="no-such-model"):
            reader.search_vector(new_vector, "no-such-model", fingerprint=new.fingerprint)
        with pytest.raises(ValueError, match="mode"):
            reader.search(text, mode="sideways")


def test_cutover_is_picked_up_within_the_ttl(harness, worker, engine, corpus):
    suite, _ = corpus
    specs = models(harness)
    ttl = 0.3
    # ``slow`` owns its engine (the default) and keeps its first view for an hour.
    with reader_for(harness, engine, serving_ttl_s=ttl) as reader, \
            SegueReader(harness.settings, database_url=harness.database_url, serving_ttl_s=3600) as slow:
        assert reader.search("glaciers", k=2, filters={"suite": suite}).models == (OLD,)
        assert slow.search("glaciers", k=2, filters={"suite": suite}).models == (OLD,)
        with serving(harness, specs[NEW]):
            time.sleep(ttl)  # the reader's view was loaded before the cutover, so it has expired now
            result = reader.search("glaciers", k=2, filters={"suite": suite})
            assert result.models == (NEW,) and {h.model for h in result.hits} == {NEW}
            assert slow.search("glaciers", k=2, filters={"suite": suite}).models == (OLD,)  # still cached
        time.sleep(ttl)
        assert reader.search("glaciers", k=2, filters={"suite": suite}).models == (OLD,)


def test_read_misses_are_rate_bounded(harness, worker, engine):
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    suite, ids = add_documents(harness, TEXTS[:5])
    lacking = ids[:4]
    drop_vectors(harness, lacking, old)
    reader = reader_for(harness, engine, read_miss_rate=1.0)
    try:
        with migration(harness, old, new):
            started = time.monotonic()
            result = reader.search("bread and yeast", k=10, filters={"suite": suite})
            assert {h.doc_id for h in result.hits if h.model == NEW} == set(lacking)
            assert len(result.read_misses) == 1 and result.read_misses[0] in lacking
            assert reader.read_miss_stats["dropped"] == 3
            second = reader.search("bread and yeast", k=10, filters={"suite": suite})
            budget = 1 + int(time.monotonic() - started)  # one token per second refills the bucket of one
            assert len(result.read_misses) + len(second.read_misses) <= budget
            assert result.read_misses[0] not in second.read_misses
        reader.close()  # flushes
        stats = reader.read_miss_stats
        assert stats["published"] == len(result.read_misses) + len(second.read_misses) <= budget
        assert len(events_for(harness, ids)) == stats["published"]
    finally:
        reader.close()
        repair(harness, lacking, old)


def test_a_pinned_reader_reads_its_model_not_the_serving_one(harness, worker, engine, corpus):
    suite, ids = corpus
    with reader_for(harness, engine, read_model=NEW) as canary, reader_for(harness, engine) as plain:
        assert plain.search("glaciers", k=2, filters={"suite": suite}).models == (OLD,)
        pinned = canary.search("glaciers", k=len(ids), filters={"suite": suite})
        assert pinned.models == (NEW,) and {h.model for h in pinned.hits} == {NEW}
        assert sorted(h.doc_id for h in pinned.hits) == sorted(ids)
    with reader_for(harness, engine, read_model="no-such-model") as broken:
        with pytest.raises(ValueError, match="not a live model"):
            broken.search("glaciers", k=1)


@pytest.fixture
def counted_loads(monkeypatch) -> list[int]:
    """The version of every model the engines load from now on (each load from its source, warm-ups included)."""
    loads: list[int] = []
    load = providers.load

    def counting(spec: ModelSpec, device: str | None):
        loads.append(spec.version)
        return load(spec, device)

    monkeypatch.setattr(providers, "load", counting)
    return loads


def test_a_reader_warms_the_new_model_when_a_migration_starts(harness, worker, corpus, counted_loads):
    suite, _ = corpus
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    ttl = 0.3
    fresh = EmbeddingEngine()  # loads nothing until the reader warms a model
    try:
        with reader_for(harness, fresh, serving_ttl_s=ttl) as reader:
            wait_for(lambda: old.version in fresh.loaded(), timeout=30, what="the read model warmed as the reader starts")
            assert reader.search("glaciers", k=2, filters={"suite": suite}).models == (OLD,)
            assert new.version not in fresh.loaded()
            with migration(harness, old, new):
                time.sleep(ttl)  # the reader's view was read before the start: it has expired now
                # The read model's column is complete, so this search embeds with the read model alone.
                assert reader.search("glaciers", k=2, filters={"suite": suite}).models == (OLD,)
                wait_for(lambda: new.version in fresh.loaded(), timeout=30,
                         what="the new model warmed within one view refresh, without a search on it")
                loads_before = list(counted_loads)
                first = reader.search("glaciers", k=2, filters={"suite": suite}, mode="parallel")
                assert first.models == (OLD, NEW) and first.hits
                assert counted_loads == loads_before  # the first search on the new model loaded nothing
        assert sorted(counted_loads) == sorted([old.version, new.version])  # each warmed once
    finally:
        fresh.close()


def test_a_failed_warm_up_is_logged_once_and_the_search_loads_on_demand(harness, worker, corpus, counted_loads,
                                                                       monkeypatch, caplog):
    suite, _ = corpus
    specs = models(harness)
    old, new = specs[OLD], specs[NEW]
    counting = providers.load
    refused: list[int] = []

    def unreachable_once(spec: ModelSpec, device: str | None):
        if spec.version == new.version and not refused:
            refused.append(spec.version)
            raise OSError("the model's files are briefly unreachable")
        return counting(spec, device)

    monkeypatch.setattr(providers, "load", unreachable_once)
    caplog.set_level(logging.WARNING, logger="segue.client.reader")
    fresh = EmbeddingEngine()
    try:
        # Created mid-migration, the reader warms both models; every search re-reads its view (TTL 0).
        with migration(harness, old, new), reader_for(harness, fresh, serving_ttl_s=0) as reader:
            said = wait_for(lambda: [r for r in caplog.records if "could not warm" in r.getMessage()], timeout=30,
                            what="the failed warm-up to be logged")
            assert old.version in fresh.loaded() and new.version not in fresh.loaded()
            for _ in range(3):
                result = reader.search("glaciers", k=2, filters={"suite": suite}, mode="parallel")
                assert result.models == (OLD, NEW) and result.hits
            assert len(said) == 1 and said[0].levelno == logging.WARNING and NEW in said[0].getMessage()
            assert [r for r in caplog.records if "could not warm" in r.getMessage()] == said
        # The new model: one failed warm-up, then one load on demand by the first search; never warmed again.
        assert refused == [new.version] and sorted(counted_loads) == sorted([old.version, new.version])
    finally:
        fresh.close()
