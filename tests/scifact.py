"""The SciFact migration the quality tests run on: the 256-d static model → all-MiniLM-L6-v2, a corpus embedded ahead."""

from __future__ import annotations

import hashlib
from pathlib import Path

from psycopg import sql

from segue.control import migration, registry
from segue.devtools.corpus import scifact_documents, store_embedded
from segue.devtools.modelkit import distill_static, minilm_path
from segue.embedding.engine import EmbeddingEngine
from segue.storage import connections, model_columns
from tests.harness import Harness


def start_scifact_migration(h: Harness, engine: EmbeddingEngine, model_cache: Path, docs: int, *,
                            covered_pct: int = 100) -> None:
    """Register ``static`` and ``minilm``, store the first ``docs`` abstracts with a static vector each and a minilm
    vector on ``covered_pct`` % of them (a deterministic sample, by hash), and start static → minilm."""
    static_dir = distill_static(str(minilm_path()), model_cache / "minilm-static-256", dims=256)
    corpus = list(scifact_documents(docs))
    covered = sorted(corpus, key=lambda d: hashlib.md5(d.doc_id.encode()).hexdigest())[:docs * covered_pct // 100]
    with connections.connect(h.settings, h.database_url) as conn:
        static = registry.register_model(conn, "static", str(static_dir))
        minilm = registry.register_model(conn, "minilm", str(minilm_path()))
        store_embedded(conn, corpus, {static: engine.embed_sync(static, [d.text for d in corpus])})
        write = sql.SQL("UPDATE documents SET {v} = %s, {h} = content_sha256 WHERE doc_id = %s").format(
            v=model_columns.vector_column(minilm.version), h=model_columns.sha_column(minilm.version))
        with conn.cursor() as cur:
            cur.executemany(write, list(zip(engine.embed_sync(minilm, [d.text for d in covered]),
                                            [d.doc_id for d in covered])))
        migration.start(conn, "minilm", cutover_min_coverage_pct=100.0)
