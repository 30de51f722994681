"""Bridged reads: the new model served before its column is complete, through an adapter fitted on the pairs.

The corpus is the first 800 SciFact abstracts (55 judged queries), all embedded by the 256-d
static model and a deterministic quarter of them by all-MiniLM-L6-v2: the migration static →
MiniLM a quarter of the way through. (On 300 abstracts a quarter is 75 pairs, too few to fit a
384 → 256 map; ``python benchmarks/bench_bridged.py`` has the whole corpus.)
"""

from __future__ import annotations

import logging

import ir_measures
import numpy as np
import pytest
from ir_measures import nDCG
from psycopg import sql

from segue.client.reader import SegueReader
from segue.control import bridging, registry
from segue.devtools.corpus import bundled_scifact, scifact_documents
from segue.embedding.engine import EmbeddingEngine
from segue.storage import connections, locks, model_columns
from tests.harness import Harness
from tests.scifact import start_scifact_migration

DOCS = 800
COVERED_PCT = 25


@pytest.fixture(scope="module")
def bh(tmp_path_factory, model_cache):
    """Services with static → minilm running, a quarter of the abstracts embedded by minilm, all by static."""
    h = Harness(tmp_path_factory.mktemp("bridged"))
    engine = EmbeddingEngine(device="cpu")
    start_scifact_migration(h, engine, model_cache, DOCS, covered_pct=COVERED_PCT)
    h.engine = engine
    yield h
    engine.close()
    h.close()


def ndcg_of(h, mode: str, read_model: str) -> tuple[float, set[str]]:
    """nDCG@10 over the judged queries of the bundled set as a reader in ``mode`` reading ``read_model`` ranks
    them; and the models that ranked the hits."""
    labelled = bundled_scifact()
    present = {d.doc_id for d in scifact_documents(DOCS)}
    queries = [q for q in labelled.judged() if any(r > 0 and d in present for d, r in labelled.qrels[q].items())]
    qrels = [ir_measures.Qrel(q, d, r) for q in queries for d, r in labelled.qrels[q].items()]
    run, models = [], set()
    with SegueReader(database_url=h.database_url, engine=h.engine, mode=mode, read_model=read_model,
                     read_miss_rate=0) as reader:
        for q in queries:
            result = reader.search(labelled.queries[q], k=10)
            assert result.mode == mode
            models |= {hit.model for hit in result.hits}
            run += [ir_measures.ScoredDoc(q, hit.doc_id, 10.0 - rank) for rank, hit in enumerate(result.hits)]
    return ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10], models


def test_bridged_reads_beat_incremental_at_a_quarter_and_open_the_gate_early(bh):
    refused = bh.segue("migrate", "cutover", check=False)
    assert refused.returncode == 1 and "coverage 25.00% is below 100.00%" in refused.stderr

    incremental, by = ndcg_of(bh, "incremental", "minilm")
    assert "static" in by  # no adapter yet: the old model's own query on the documents minilm lacks
    assert "bridged reads: no adapter yet (200 documents current in both models)" in bh.segue(
        "migrate", "status").stdout
    fitted = bh.segue("adapter", "fit").stdout
    assert f"{DOCS * COVERED_PCT // 100} pairs" in fitted and "passed" in fitted
    assert "readers may bridge" in bh.segue("adapter", "show").stdout
    bridged, by = ndcg_of(bh, "bridged", "minilm")
    assert by == {"minilm", "static<-minilm"}  # the old column searched with the new model's query only
    assert bridged > incremental + 0.02, (bridged, incremental)

    # 55 queries: a 95 % interval about ±0.13 wide, so a non-inferiority margin of 0.05 (the default 0.01 is
    # for sets of hundreds of queries).
    judged = bh.segue("eval", "--scifact", "--bridged", "--margin", "-0.05").stdout
    assert judged.startswith("pass:") and "bridged at 25.00% coverage of minilm through adapter" in judged
    detail = bh.sql("SELECT detail FROM model_evaluations ORDER BY id DESC LIMIT 1")[0][0]
    assert detail["bridged"]["kind"] in ("procrustes", "affine") and detail["coverage"]["new"] == 25.0
    assert detail["comparisons"]["ndcg@10"]["new_mean"] == pytest.approx(bridged, abs=1e-9)

    bh.segue("migrate", "cutover")
    (cut,) = bh.sql("SELECT detail FROM migration_changelog WHERE action = 'migration_cut_over'")
    assert cut[0]["coverage_pct"] == 25.0 and cut[0]["min_coverage_pct"] == 100.0
    assert cut[0]["bridged"]["adapter_id"] == detail["bridged"]["adapter_id"]
    after, by = ndcg_of(bh, "incremental", "minilm")  # readers of the new model now bridge by default
    assert after == pytest.approx(bridged) and "static<-minilm" in by
    bh.segue("migrate", "rollback")


def test_bridged_reads_never_embed_with_the_old_model_and_ask_for_the_documents_they_bridged(bh):
    """The old column as an import would leave it (provider ``adopted``: Segue cannot embed its queries)."""
    bh.segue("adapter", "fit")
    bh.conn.execute("UPDATE embedding_models SET provider = 'adopted' WHERE name = 'static'")
    try:
        with SegueReader(bh.settings, database_url=bh.database_url, engine=bh.engine, read_model="minilm") as reader:
            result = reader.search("vitamin D deficiency and bone density", k=10, mode="bridged")
            bridged = [hit.doc_id for hit in result.hits if hit.model == "static<-minilm"]
            assert result.mode == "bridged" and bridged and result.read_misses == bridged
        assert reader.read_miss_stats["published"] == len(bridged)  # close() flushed them to the broker
    finally:
        bh.conn.execute("UPDATE embedding_models SET provider = 'static' WHERE name = 'static'")


def test_an_adapter_between_unrelated_spaces_is_refused_and_readers_keep_todays_behaviour(bh, caplog):
    """The minilm vectors of the covered quarter shuffled among its documents: pairs that do not belong together."""
    with connections.connect(bh.settings, bh.database_url) as conn:
        minilm = registry.get_model(conn, "minilm").spec
        column = model_columns.vector_column(minilm.version)
        rows = conn.execute(sql.SQL("SELECT doc_id, {v} FROM documents WHERE {v} IS NOT NULL ORDER BY doc_id").format(
            v=column)).fetchall()
        shuffled = np.random.default_rng(0).permutation(len(rows))
        update = sql.SQL("UPDATE documents SET {v} = %s WHERE doc_id = %s").format(v=column)
        with conn.cursor() as cur:
            cur.executemany(update, [(rows[j][1], rows[i][0]) for i, j in enumerate(shuffled)])
        try:
            refused = bh.segue("adapter", "fit", check=False)
            assert refused.returncode == 1 and "below the 30% bridged reads need" in refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
            shown = bh.segue("adapter", "show").stdout
            assert shown.startswith("bridging minilm → static: refused: ") and "too far apart to bridge" in shown
            assert "bridged reads: refused: " in bh.segue("migrate", "status").stdout
            judged = bh.segue("eval", "--scifact", "--bridged", check=False)
            assert judged.returncode == 1 and "too far apart to bridge" in judged.stderr
            cutover = bh.segue("migrate", "cutover", check=False)  # the bridged pass was judged with another map
            assert cutover.returncode == 1 and "the bridged verdict no longer counts" in cutover.stderr
            with caplog.at_level(logging.WARNING, logger="segue.client.reader"):
                _, by = ndcg_of(bh, "incremental", "minilm")
                with SegueReader(database_url=bh.database_url, engine=bh.engine, mode="bridged",
                                 read_model="minilm", read_miss_rate=0) as reader:
                    results = [reader.search(text, k=5) for text in ("sleep and memory", "vitamin D deficiency")]
            assert "static<-minilm" not in by
            assert [r.mode for r in results] == ["incremental", "incremental"]
            assert {hit.model for r in results for hit in r.hits} <= {"minilm", "static"}
            said = [r.getMessage() for r in caplog.records if "bridged reads search as incremental" in r.getMessage()]
            assert len(said) == 1 and "too far apart to bridge" in said[0]
        finally:
            with conn.cursor() as cur:
                cur.executemany(update, [(vector, doc_id) for doc_id, vector in rows])


def test_workers_refit_once_enough_new_pairs_exist_and_only_one_fits_at_a_time(bh):
    settings = bh.settings.model_copy(update={"adapter_refit_every": 150})
    with connections.connect(bh.settings, bh.database_url) as conn, \
            connections.connect(bh.settings, bh.database_url) as other:
        conn.execute("DELETE FROM model_adapters")
        with locks.held_if_free(other, locks.Lock.ADAPTER_FIT) as held:  # another worker is fitting
            assert held and bridging.refit_when_due(conn, settings) is None
        first = bridging.refit_when_due(conn, settings)  # 200 current vectors ≥ 0 + 150: due
        assert first is not None and first.fitted.pairs == DOCS * COVERED_PCT // 100
        assert bridging.refit_when_due(conn, settings) is None  # 200 < 200 + 150: not yet
        assert bridging.refit_when_due(conn, settings.model_copy(update={"adapter_refit_every": 0})) is None
        (count,) = conn.execute("SELECT count(*) FROM model_adapters").fetchone()
    assert count == 1
