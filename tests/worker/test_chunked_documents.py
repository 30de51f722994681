"""A chunked model through a real worker, broker and PostgreSQL: chunk rows, version rules, per-chunk re-embeds,
read misses, and reads that rank documents by their best chunk, alone and merged with an unchunked model."""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from segue.client.reader import SegueReader
from segue.control import migration, plan, registry
from segue.embedding import chunking, providers
from segue.embedding.engine import EmbeddingEngine
from segue.schemas.events import encode_read_miss
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.harness import Harness, change, wait_for

OLD = "whole"
CHUNKED = "chunked"
POLICY = {"splitter": "sentences", "size": 24, "overlap": 0, "title": "first_line"}


def paragraph(n: int, topic: str = "cells") -> str:
    return (f"Paragraph {n} studies {topic} under stress. The {topic} divide slowly in experiment {n}. "
            f"Proteins fold differently at step {n}.")


def long_document(paragraphs: int = 20, *, edited: int | None = None) -> str:
    return "A long report on cell biology\n\n" + "\n\n".join(
        paragraph(n, "neurons" if n == edited else "cells") for n in range(paragraphs))


@pytest.fixture(scope="module")
def ch(tmp_path_factory, model_cache):
    h = Harness(tmp_path_factory.mktemp("chunked"))
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, OLD, str(modelfactory.tiny_static(model_cache)))
        registry.register_model(conn, CHUNKED, str(modelfactory.tiny_transformer_a(model_cache)), chunking=POLICY)
    worker = h.start_worker()
    h.wait_ready(worker)
    yield h
    h.close()


@pytest.fixture(scope="module")
def spec(ch):
    with connections.connect(ch.settings, ch.database_url) as conn:
        return registry.get_model(conn, CHUNKED).spec


@pytest.fixture(scope="module")
def local_engine():
    engine = EmbeddingEngine(device="cpu")
    yield engine
    engine.close()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def expected_chunks(engine: EmbeddingEngine, spec, body: str) -> list[chunking.Chunk]:
    return chunking.split(chunking.policy_of(spec), body, engine.token_spans_sync(spec, [body])[0])


def chunk_rows(h: Harness, spec, doc_id: str) -> list[tuple]:
    return h.sql(sql.SQL("SELECT chunk_no, start_char, end_char, chunk_sha256, embedding, xmin::text::bigint"
                         " FROM {} WHERE doc_id = %s ORDER BY chunk_no").format(model_columns.chunk_table(spec.version)),
                 (doc_id,))


def embedded_detail(h: Harness, spec, doc_id: str, version: int) -> dict | None:
    return h.scalar("SELECT detail FROM migration_changelog WHERE doc_id = %s AND model_version = %s"
                    " AND doc_version = %s AND action = 'embedded'", (doc_id, spec.version, version))


def stored_version(h: Harness, doc_id: str) -> int | None:
    return h.scalar("SELECT version FROM documents WHERE doc_id = %s", (doc_id,))


def test_the_policy_is_part_of_the_identity(model_cache):
    source = str(modelfactory.tiny_transformer_a(model_cache))
    whole = providers.inspect(source)
    chunked = providers.inspect(source, chunking=POLICY)
    other = providers.inspect(source, chunking={**POLICY, "size": 32})
    assert len({whole.fingerprint, chunked.fingerprint, other.fingerprint}) == 3
    assert chunked.config["embedder_fingerprint"] == other.config["embedder_fingerprint"] == whole.fingerprint
    assert chunked.config["chunking"] == chunking.ChunkingPolicy(**POLICY).model_dump()
    with pytest.raises(providers.OptionsError, match="exceeds the model's input limit of 128 tokens"):
        providers.inspect(source, chunking={"size": 129})
    with pytest.raises(providers.OptionsError, match="overlap"):
        providers.inspect(source, chunking={"size": 16, "overlap": 16})


def test_a_change_writes_its_chunks_with_offsets_and_the_document_vector_is_their_mean(ch, spec, local_engine):
    doc_id = uid("doc")
    body = long_document(6)
    ch.publish_changes([(doc_id, change(doc_id, body, 1))])
    wait_for(lambda: embedded_detail(ch, spec, doc_id, 1), what="the chunked model's embedded row")

    expected = expected_chunks(local_engine, spec, body)
    rows = chunk_rows(ch, spec, doc_id)
    assert [(no, start, end, bytes(sha)) for no, start, end, sha, _, _ in rows] == [
        (n, c.start, c.end, c.sha256) for n, c in enumerate(expected)]
    assert all(c.text.startswith("A long report on cell biology\n") for c in expected)
    assert embedded_detail(ch, spec, doc_id, 1) == {"chunks": len(expected), "chunks_embedded": len(expected)}
    vectors = np.stack([r[4].to_numpy() for r in rows])
    direct = local_engine.embed_sync(spec, [c.text for c in expected])
    assert np.allclose(vectors, direct, atol=1e-5)
    mean = vectors.mean(axis=0)
    stored = ch.scalar(sql.SQL("SELECT {} FROM documents WHERE doc_id = %s").format(
        model_columns.vector_column(spec.version)), (doc_id,)).to_numpy()
    assert np.allclose(stored, mean / np.linalg.norm(mean), atol=1e-5)


def test_a_dollar_budget_counts_the_tokens_the_worker_gives_every_chunk(ch, spec, local_engine):
    doc_id = uid("budget")
    body = long_document(20)
    ch.publish_changes([(doc_id, change(doc_id, body, 1))])
    wait_for(lambda: embedded_detail(ch, spec, doc_id, 1), what="the chunked model's embedded row")
    worker_used = ch.scalar("SELECT tokens_used FROM migration_changelog WHERE doc_id = %s AND model_version = %s"
                            " AND action = 'embedded'", (doc_id, spec.version))
    [counted] = plan.tokens_given(local_engine, spec, [body])
    assert counted == worker_used
    assert counted >= local_engine.count_tokens(spec, [body])[0] > spec.max_tokens  # all of it, not a truncation


def test_editing_one_paragraph_re_embeds_only_its_chunks(ch, spec, local_engine):
    doc_id = uid("edit")
    before, after = long_document(20), long_document(20, edited=7)
    ch.publish_changes([(doc_id, change(doc_id, before, 1))])
    wait_for(lambda: embedded_detail(ch, spec, doc_id, 1), what="the first version embedded")
    first = chunk_rows(ch, spec, doc_id)
    assert len(first) >= 20

    ch.publish_changes([(doc_id, change(doc_id, after, 2))])
    wait_for(lambda: embedded_detail(ch, spec, doc_id, 2), what="the edit embedded")
    old_hashes = {c.sha256 for c in expected_chunks(local_engine, spec, before)}
    new_chunks = expected_chunks(local_engine, spec, after)
    touched = [n for n, c in enumerate(new_chunks) if c.sha256 not in old_hashes]
    assert 1 <= len(touched) <= 2
    assert embedded_detail(ch, spec, doc_id, 2) == {"chunks": len(new_chunks), "chunks_embedded": len(touched)}
    second = chunk_rows(ch, spec, doc_id)
    assert [bytes(r[3]) for r in second] == [c.sha256 for c in new_chunks]
    assert [(r[1], r[2]) for r in second] == [(c.start, c.end) for c in new_chunks]
    rewritten = {no for (no, *_, xmin), (_, *_, old_xmin) in zip(second, first) if xmin != old_xmin}
    assert min(rewritten) == touched[0]  # the chunks before the edit were not written again; those after it moved
    for n in set(range(len(second))) - set(touched):  # and kept their vectors
        assert np.array_equal(second[n][4].to_numpy(), first[n][4].to_numpy())


def test_out_of_order_edits_deletes_and_tombstones_keep_the_chunks_of_the_newest_version(ch, spec, local_engine):
    doc_id = uid("order")
    v3, v2 = long_document(3, edited=1), long_document(4)
    ch.publish_changes([(doc_id, change(doc_id, v3, 3)), (doc_id, change(doc_id, v2, 2))])
    wait_for(lambda: embedded_detail(ch, spec, doc_id, 3), what="version 3 embedded")
    wait_for(lambda: ch.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = %s AND doc_version = 2",
                               (doc_id,)) >= 2, what="version 2's outcome recorded")
    assert [bytes(r[3]) for r in chunk_rows(ch, spec, doc_id)] == [
        c.sha256 for c in expected_chunks(local_engine, spec, v3)]

    ch.publish_changes([(doc_id, change(doc_id, None, 4, op="delete"))])
    wait_for(lambda: stored_version(ch, doc_id) is None, what="the delete")
    assert chunk_rows(ch, spec, doc_id) == []
    ch.publish_changes([(doc_id, change(doc_id, long_document(2), 3))])  # older than the tombstone
    wait_for(lambda: ch.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = %s AND doc_version = 3"
                               " AND action = 'superseded'", (doc_id,)) >= 2, what="the late upsert superseded")
    assert stored_version(ch, doc_id) is None and chunk_rows(ch, spec, doc_id) == []


def test_a_read_miss_re_embeds_the_chunks_of_a_document_that_lacks_them(ch, spec, local_engine):
    doc_id = uid("miss")
    body = long_document(3)
    ch.publish_changes([(doc_id, change(doc_id, body, 1))])
    wait_for(lambda: embedded_detail(ch, spec, doc_id, 1), what="the document embedded")
    ch.conn.execute(sql.SQL("UPDATE documents SET {h} = NULL WHERE doc_id = %s").format(
        h=model_columns.sha_column(spec.version)), (doc_id,))
    ch.conn.execute(sql.SQL("DELETE FROM {} WHERE doc_id = %s").format(model_columns.chunk_table(spec.version)),
                    (doc_id,))

    ch.publish_read_misses([(doc_id, encode_read_miss(doc_id, CHUNKED))])
    wait_for(lambda: ch.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = %s AND origin = 'read_miss'"
                               " AND action = 'embedded'", (doc_id,)) == 1, what="the read miss embedded")
    expected = expected_chunks(local_engine, spec, body)
    assert [bytes(r[3]) for r in chunk_rows(ch, spec, doc_id)] == [c.sha256 for c in expected]
    assert ch.scalar(sql.SQL("SELECT {h} = content_sha256 FROM documents WHERE doc_id = %s").format(
        h=model_columns.sha_column(spec.version)), (doc_id,))


EDGE_BODIES = ["", " ", "\n\n\n", "only a title\n", "# just a heading", "##\n\n#", "🙂" * 40, "a\u0301" * 50,
               ". . . ! ? .", "word " * 300, "\t\n".join(["x"] * 60)]
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=400)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies=st.lists(ANY_TEXT, min_size=8, max_size=8))
def test_hostile_bodies_are_chunked_and_written_or_reported_and_nothing_stalls(ch, spec, local_engine, bodies):
    docs = {uid("hostile"): body for body in EDGE_BODIES + bodies}
    ch.publish_changes([(doc_id, change(doc_id, body, 1)) for doc_id, body in docs.items()])
    outcome = {}
    for doc_id in docs:
        outcome[doc_id] = wait_for(lambda d=doc_id: ch.scalar(
            "SELECT action FROM migration_changelog WHERE doc_id = %s AND model_version = %s AND origin = 'change'",
            (d, spec.version)), what="an outcome for every hostile body")
    for doc_id, body in docs.items():
        if outcome[doc_id] != "embedded":  # a text the model gives no vector: dead-lettered with its reason
            assert outcome[doc_id] == "failed" and any(d["key"] == doc_id for d in ch.dead_letters())
            continue
        rows = chunk_rows(ch, spec, doc_id)
        assert [bytes(r[3]) for r in rows] == [c.sha256 for c in expected_chunks(local_engine, spec, body)]
        assert all(0 <= start <= end <= len(body) for _, start, end, *_ in rows) and rows


def test_reads_rank_documents_by_their_best_chunk_and_merge_with_an_unchunked_model(ch, spec, local_engine):
    docs = {uid("rank"): long_document(8, edited=n) for n in range(5)}
    ch.publish_changes([(doc_id, change(doc_id, body, 1)) for doc_id, body in docs.items()])
    for doc_id in docs:
        wait_for(lambda d=doc_id: embedded_detail(ch, spec, d, 1), what="the documents embedded")
    target = list(docs)[3]
    where = docs[target].index("neurons")  # only this document's paragraph 3 says it: a chunk no other has
    best = next(r for r in chunk_rows(ch, spec, target) if r[1] <= where < r[2])

    with SegueReader(ch.settings, database_url=ch.database_url, read_model=CHUNKED) as reader:
        result = reader.search_vector(best[4].to_numpy(), CHUNKED, fingerprint=spec.fingerprint, k=3)
    top = result.hits[0]
    assert top.doc_id == target and top.score == pytest.approx(1.0, abs=1e-5)
    assert top.chunk == (best[0], best[1], best[2])
    assert len({hit.doc_id for hit in result.hits}) == len(result.hits)  # one hit a document

    with connections.connect(ch.settings, ch.database_url) as conn:
        exact = registry.get_model(conn, CHUNKED).spec
        from segue.client.search import nearest
        indexless = nearest(conn, exact, best[4].to_numpy(), 5, exact=True)
    assert [h.doc_id for h in indexless][:1] == [target]

    # a migration from the unchunked model to the chunked one, read in parallel: both rank, RRF merges
    with connections.connect(ch.settings, ch.database_url) as conn:
        migration.start(conn, CHUNKED, OLD, cutover_min_coverage_pct=100.0)
    best_text = next(c.text for c in expected_chunks(local_engine, spec, docs[target]) if c.start == best[1])
    with SegueReader(ch.settings, database_url=ch.database_url, mode="parallel") as reader:
        merged = reader.search(best_text, k=5)
    assert set(merged.models) == {OLD, CHUNKED}
    assert {name for hit in merged.hits for name in hit.model.split("+")} == {OLD, CHUNKED}
    by_doc = {hit.doc_id: hit for hit in merged.hits}
    assert CHUNKED in by_doc[target].model.split("+")
    assert by_doc[target].chunk == (best[0], best[1], best[2])  # the best chunk travels with the merged hit


def test_bridged_reads_rank_the_chunked_side_by_best_chunk_and_carry_the_documents_it_lacks(ch, spec):
    from segue.client.search import nearest_bridged
    from segue.embedding.adapters import SpaceMap

    docs = {uid("bridge"): long_document(6, edited=n) for n in range(3)}
    ch.publish_changes([(doc_id, change(doc_id, body, 1)) for doc_id, body in docs.items()])
    for doc_id in docs:
        wait_for(lambda d=doc_id: embedded_detail(ch, spec, d, 1), what="the documents embedded")
    covered, lacking, _ = docs
    where = docs[covered].index("neurons")
    best = next(r for r in chunk_rows(ch, spec, covered) if r[1] <= where < r[2])
    ch.conn.execute(sql.SQL("UPDATE documents SET {h} = NULL WHERE doc_id = %s").format(
        h=model_columns.sha_column(spec.version)), (lacking,))  # as if the backfill had not reached it
    with connections.connect(ch.settings, ch.database_url) as conn:
        old = registry.get_model(conn, OLD).spec
        old_vector = conn.execute(sql.SQL("SELECT {} FROM documents WHERE doc_id = %s").format(
            model_columns.vector_column(old.version)), (lacking,)).fetchone()[0].to_numpy()
        zero = SpaceMap("linear", np.zeros((spec.dim, old.dim), np.float32), np.zeros(old.dim, np.float32))
        total = ch.scalar("SELECT count(*) FROM documents")
        hits = nearest_bridged(conn, spec, old, zero, best[4].to_numpy(), total, old_query=old_vector, exact=True)
    by_doc = {hit.doc_id: hit for hit in hits}
    assert by_doc[covered].model == CHUNKED and by_doc[covered].score == pytest.approx(1.0, abs=1e-5)
    assert by_doc[covered].chunk == (best[0], best[1], best[2])  # ranked by its best chunk
    assert by_doc[lacking].model == f"{OLD}<-{CHUNKED}" and by_doc[lacking].chunk is None
    assert all(hit.chunk is not None for hit in hits if hit.model == CHUNKED)


def test_a_chunked_model_s_hnsw_index_is_built_on_its_chunk_table_and_searched(ch, spec):
    built = ch.segue("migrate", "index", "--now").stdout
    assert f"chunks_v{spec.version}_hnsw" in built
    assert ch.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                     (f"chunks_v{spec.version}_hnsw",))
    table = model_columns.chunk_table(spec.version)
    doc_id, no, start, end, vector = ch.sql(sql.SQL(
        "SELECT doc_id, chunk_no, start_char, end_char, embedding FROM {t} c WHERE NOT EXISTS (SELECT 1 FROM {t} x"
        " WHERE x.chunk_sha256 = c.chunk_sha256 AND x.doc_id <> c.doc_id) ORDER BY doc_id, chunk_no LIMIT 1"
    ).format(t=table))[0]
    with SegueReader(ch.settings, database_url=ch.database_url, read_model=CHUNKED) as reader:
        top = reader.search_vector(vector.to_numpy(), CHUNKED, fingerprint=spec.fingerprint, k=10).hits[0]
    assert (top.doc_id, top.chunk) == (doc_id, (no, start, end))


def test_the_cli_plans_a_chunked_model_and_refuses_a_chunk_over_its_input_limit(ch, model_cache):
    source = str(modelfactory.tiny_transformer_a(model_cache))
    planned = ch.segue("migrate", "plan", "--to", "planned", "--source", source, "--splitter", "sentences",
                       "--chunk-size", "16", "--sample", "8").stdout
    assert "chunks to embed: ≈" in planned and "a document in the sample" in planned
    dim = int(re.search(r"model planned: (\d+)-d", planned).group(1))
    chunks_a_document = float(re.search(r"\(([\d.]+) a document in the sample\)", planned).group(1))
    wal_a_document = re.search(r"WAL to fill the column and the chunk table: ≈ [\d.,]+ MiB \(([\d,]+) bytes a document",
                               planned).group(1)
    assert int(wal_a_document.replace(",", "")) > chunks_a_document * plan.chunk_row_bytes(dim) > 0
    assert "bytes a document: its vector, its hash and its chunks; 4·" in planned

    refused = ch.segue("models", "add", "too-wide", "--source", source, "--chunk-size", "500", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: chunking size 500 exceeds the model's input limit of 128 tokens: give --chunk-size 128 or less"]
    unchunked = ch.segue("migrate", "start", "--to", CHUNKED, "--chunk-size", "16", check=False)
    assert unchunked.returncode == 2 and "give --source too" in unchunked.stderr
