"""The sweeper, the HNSW index builder and the backfill's watermark, on services of their own.

The tests run in order on one database: documents are written before any model
exists, a first model is registered (the sweeper fills it), lost re-embeds are healed
except those that failed recently, then a migration to a 2,001-d model whose HNSW
build pgvector refuses, and a backfill that loses a record.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError
from psycopg import sql

from segue.control import backfill, registry
from segue.control.backfill import BackfillLimits, run_backfill
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.harness import Harness, change, wait_for

CORPUS = 300
FIRST, WIDE = "first", "wide"


@pytest.fixture(scope="module")
def sh(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("sweeper"))
    h.env.update(SEGUE_SWEEPER_INTERVAL_S="1", SEGUE_SWEEPER_MAX_AGE_S="1", SEGUE_SWEEPER_SCAN_ROWS="50",
                 SEGUE_INDEX_MIN_COVERAGE_PCT="0", SEGUE_INDEX_MAX_FAILURES="2")
    h.wait_ready(h.start_worker())
    yield h
    h.close()


def ids() -> list[str]:
    return [f"doc-{n:04d}" for n in range(CORPUS)]


def spec(h, name):
    with connections.connect(h.settings, h.database_url) as conn:
        return registry.get_model(conn, name).spec


def current(h, name) -> int:
    return h.scalar(sql.SQL("SELECT count(*) FROM documents WHERE doc_id LIKE 'doc-%%' AND {} = content_sha256")
                    .format(model_columns.sha_column(spec(h, name).version)))


def test_a_first_model_over_an_existing_corpus_is_filled_without_a_backfill(sh, model_cache):
    sh.publish_changes([(i, change(i, f"abstract {n}: proteins fold and cells divide", 1)) for n, i in enumerate(ids())])
    wait_for(lambda: sh.scalar("SELECT count(*) FROM documents WHERE doc_id LIKE 'doc-%%'") == CORPUS,
             what="the corpus stored with no model")
    with connections.connect(sh.settings, sh.database_url) as conn:
        registry.register_model(conn, FIRST, str(modelfactory.tiny_static(model_cache)))
    wait_for(lambda: current(sh, FIRST) == CORPUS, timeout=120, what="the sweeper to fill the first model")
    assert sh.scalar("SELECT count(*) FROM migration_changelog WHERE event_id = 'sweeper' AND action = 'embedded'"
                     " AND doc_id LIKE 'doc-%%'") == CORPUS
    # 301 documents (with the readiness probe) at 50 a step: the pass moved through the corpus in slices.
    progress = "SELECT passes, enqueued FROM sweeper_progress WHERE model_version = %s"
    passes, enqueued = wait_for(lambda: (row := sh.sql(progress, (spec(sh, FIRST).version,))[0])[0] >= 1 and row,
                                what="the first pass to end")
    assert enqueued >= CORPUS


def test_lost_reembeds_heal_but_recent_failures_are_not_retried(sh):
    first = spec(sh, FIRST)
    lost, failed = ids()[10:15], ids()[200:205]
    sh.sql(sql.SQL("UPDATE documents SET {} = NULL, {} = NULL WHERE doc_id = ANY(%s) RETURNING 1").format(
        model_columns.vector_column(first.version), model_columns.sha_column(first.version)), (lost + failed,))
    sh.sql("INSERT INTO migration_changelog (doc_id, model_version, action, origin, error)"
           " SELECT unnest(%s::text[]), %s, 'failed', 'backfill', 'ValueError: cannot embed' RETURNING 1",
           (failed, first.version))
    passes = "SELECT passes FROM sweeper_progress WHERE model_version = %s"
    before = sh.scalar(passes, (first.version,))
    wait_for(lambda: current(sh, FIRST) == CORPUS - len(failed), timeout=60, what="the lost re-embeds healed")
    wait_for(lambda: sh.scalar(passes, (first.version,)) >= before + 3, timeout=60, what="three more passes")
    assert current(sh, FIRST) == CORPUS - len(failed)
    assert sh.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = ANY(%s) AND event_id = 'sweeper'"
                     " AND at > (SELECT max(at) FROM migration_changelog WHERE action = 'failed')", (failed,)) == 0


def test_an_hnsw_build_pgvector_refuses_is_recorded_and_workers_stop_after_the_cap(sh, model_cache):
    sh.segue("migrate", "start", "--to", WIDE, "--source", str(modelfactory.tiny_static_wide(model_cache)))
    wide = spec(sh, WIDE)
    failures = "SELECT count(*) FROM migration_changelog WHERE action = 'index_failed' AND model_version = %s"
    wait_for(lambda: sh.scalar(failures, (wide.version,)) == 2, timeout=60, what="two failed builds")
    error = sh.scalar("SELECT error FROM migration_changelog WHERE action = 'index_failed' ORDER BY id DESC LIMIT 1")
    assert "2000 dimensions" in error
    assert sh.scalar("SELECT to_regclass('documents_embedding_v%s_hnsw'::text)" % wide.version) is None
    wait_for(lambda: sh.scalar("SELECT count(*) FROM sweeper_progress WHERE passes > 0 AND model_version = %s",
                               (wide.version,)), timeout=30, what="a few worker ticks")
    assert sh.scalar(failures, (wide.version,)) == 2, "workers kept retrying past the cap"
    status = sh.segue("migrate", "status").stdout
    assert "2 failed build(s); workers stopped trying after 2" in " ".join(status.split())
    assert "2000 dimensions" in status


def test_the_backfill_watermark_never_passes_an_unacknowledged_record(sh, monkeypatch):
    wide = spec(sh, WIDE)
    lacking = [i for (i,) in sh.sql(sql.SQL("SELECT doc_id FROM documents WHERE {} IS DISTINCT FROM content_sha256"
                                            " ORDER BY doc_id").format(model_columns.sha_column(wide.version)))]
    doomed = lacking[50]  # on the third page of 20

    class LosesOneRecord(AIOKafkaProducer):
        """The real producer, except that one record is never acknowledged (as when its batch expires)."""

        async def send(self, topic, value=None, key=None, **kwargs):
            if key == doomed.encode():
                lost = asyncio.get_running_loop().create_future()
                lost.set_exception(KafkaTimeoutError("batch expired (injected)"))
                return lost
            return await super().send(topic, value=value, key=key, **kwargs)

    monkeypatch.setattr(backfill, "AIOKafkaProducer", LosesOneRecord)
    with connections.connect(sh.settings, sh.database_url) as conn:
        with pytest.raises(KafkaTimeoutError):
            asyncio.run(run_backfill(sh.settings, conn, sh.bootstrap, wide, BackfillLimits(), page_size=20))
        watermark = "SELECT watermark FROM backfill_progress WHERE model_version = %s"
        assert sh.scalar(watermark, (wide.version,)) == lacking[39]  # the end of the last page fully acknowledged
        monkeypatch.undo()
        resumed = asyncio.run(run_backfill(sh.settings, conn, sh.bootstrap, wide, BackfillLimits(), page_size=20))
    assert resumed.stopped == "complete" and resumed.published >= len(lacking) - 40
    wait_for(lambda: sh.scalar(sql.SQL("SELECT {} = content_sha256 FROM documents WHERE doc_id = %s").format(
        model_columns.sha_column(wide.version)), (doomed,)), timeout=60, what="the once-lost document embedded")
