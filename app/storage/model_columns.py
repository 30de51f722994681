"""The columns each registered model owns on ``documents``, their HNSW index, and the counters kept on them.

Each registered model version N owns two columns on ``documents``:
``embedding_vN vector(dim)`` and ``embedding_vN_sha256 bytea``, and may own an HNSW
index on the first; a chunked model also owns ``chunks_vN`` (:mod:`segue.storage.chunks`),
which then holds its HNSW index. ``vector_counters`` holds its current and stale vectors and
``corpus_counters`` the documents; the statement-level triggers that keep them exact
are generated here from the list of live models and regenerated whenever that list
changes. Adding and dropping columns is DDL: callers run it through
:func:`segue.storage.upgrades.run_ddl`.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from segue.storage import registry


def vector_column(version: int) -> sql.Identifier:
    """The vector column of model version ``version``."""
    return sql.Identifier(f"embedding_v{version}")


def sha_column(version: int) -> sql.Identifier:
    """The column holding the content hash that model version ``version``'s vector was built from."""
    return sql.Identifier(f"embedding_v{version}_sha256")


def chunk_table(version: int) -> sql.Identifier:
    """The chunk table of model version ``version``, when it is a chunked model (see :mod:`segue.storage.chunks`)."""
    return sql.Identifier(f"chunks_v{version}")


def _indexed(conn: psycopg.Connection, version: int) -> tuple[sql.Identifier, sql.Identifier, sql.Identifier]:
    """(index, table, column) of model ``version``'s HNSW index: on its chunk table's vectors when it has one,
    else on its column of ``documents``."""
    if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"chunks_v{version}",)).fetchone()[0]:
        return sql.Identifier(f"chunks_v{version}_hnsw"), chunk_table(version), sql.Identifier("embedding")
    return sql.Identifier(f"documents_embedding_v{version}_hnsw"), sql.Identifier("documents"), vector_column(version)


def indexed_rows(conn: psycopg.Connection, version: int) -> int:
    """Rows model ``version``'s HNSW index takes: its documents, or a chunked model's chunks (the planner's estimate,
    counted when the table was never analysed)."""
    estimate = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                            (f"chunks_v{version}",)).fetchone()
    if estimate is None:
        return document_count(conn)
    if estimate[0] >= 0:
        return estimate[0]
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(chunk_table(version))).fetchone()[0]


def index_name(conn: psycopg.Connection, version: int) -> sql.Identifier:
    """The HNSW index of model version ``version``."""
    return _indexed(conn, version)[0]


def add(conn: psycopg.Connection, version: int, dim: int) -> None:
    """Add model ``version``'s two columns and its counters, and regenerate the triggers (it must be live)."""
    conn.execute(sql.SQL("ALTER TABLE documents ADD COLUMN {} vector({}), ADD COLUMN {} bytea").format(
        vector_column(version), sql.Literal(dim), sha_column(version)))
    conn.execute("INSERT INTO vector_counters (model_version) VALUES (%s)", (version,))
    install_vector_counters(conn)


def drop(conn: psycopg.Connection, version: int) -> None:
    """Drop model ``version``'s index, chunk table, columns and counters, and regenerate the triggers (it must be
    retired)."""
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(index_name(conn, version)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(chunk_table(version)))
    conn.execute(sql.SQL("ALTER TABLE documents DROP COLUMN IF EXISTS {}, DROP COLUMN IF EXISTS {}").format(
        vector_column(version), sha_column(version)))
    conn.execute("DELETE FROM vector_counters WHERE model_version = %s", (version,))
    install_vector_counters(conn)


def index_valid(conn: psycopg.Connection, version: int) -> bool | None:
    """Whether model ``version``'s HNSW index is usable: None when there is none, False when a build left it
    invalid (interrupted, or under way)."""
    row = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                       (index_name(conn, version).as_string(conn),)).fetchone()
    return None if row is None else row[0]


def create_index(conn: psycopg.Connection, version: int, *, m: int, ef_construction: int, memory_mb: int) -> None:
    """CREATE INDEX CONCURRENTLY model ``version``'s HNSW index with ``memory_mb`` of maintenance_work_mem
    (an autocommit connection, outside a transaction)."""
    index, table, column = _indexed(conn, version)
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory_mb}MB")))
    conn.execute(
        sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING hnsw ({} vector_cosine_ops)"
            " WITH (m = {}, ef_construction = {})"
        ).format(index, table, column, sql.Literal(m), sql.Literal(ef_construction))
    )


def drop_index_concurrently(conn: psycopg.Connection, version: int) -> None:
    """DROP INDEX CONCURRENTLY model ``version``'s HNSW index, if it exists (an invalid one a build left)."""
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index_name(conn, version)))


def vector_counts(conn: psycopg.Connection, version: int) -> tuple[int, int] | None:
    """(current vectors of model ``version``, documents), from the exact counters; None once it is retired."""
    return conn.execute(
        "SELECT v.current, c.documents FROM vector_counters v CROSS JOIN corpus_counters c WHERE v.model_version = %s",
        (version,),
    ).fetchone()


def document_count(conn: psycopg.Connection) -> int:
    """Documents stored, from the exact counter."""
    return conn.execute("SELECT documents FROM corpus_counters").fetchone()[0]


def _signed_counts(rows: str, sign: int, versions: list[int]) -> sql.Composed:
    """Per-model (current, stale) contributions of a transition table, times ``sign``."""
    parts = [
        sql.SQL(
            "SELECT {v} AS model_version, {s} * count(*) FILTER (WHERE {h} = content_sha256) AS current,"
            " {s} * count(*) FILTER (WHERE {h} <> content_sha256) AS stale FROM {rows}"
        ).format(v=sql.Literal(v), s=sql.Literal(sign), h=sha_column(v), rows=sql.Identifier(rows))
        for v in versions
    ]
    return sql.SQL(" UNION ALL ").join(parts)


def _counter_body(sources: list[tuple[str, int]], versions: list[int]) -> sql.Composed:
    docs_delta = sql.SQL(" + ").join(
        sql.SQL("{} * (SELECT count(*) FROM {})").format(sql.Literal(sign), sql.Identifier(rows))
        for rows, sign in sources
    )
    statements = [sql.SQL("UPDATE corpus_counters SET documents = documents + {};").format(docs_delta)]
    if versions:
        deltas = sql.SQL(" UNION ALL ").join(_signed_counts(rows, sign, versions) for rows, sign in sources)
        statements.append(
            sql.SQL(
                "UPDATE vector_counters v SET current = v.current + d.current, stale = v.stale + d.stale"
                " FROM (SELECT model_version, sum(current) AS current, sum(stale) AS stale FROM ({deltas}) x"
                " GROUP BY model_version) d WHERE v.model_version = d.model_version;"
            ).format(deltas=deltas)
        )
    return sql.SQL(" ").join(statements)


_TRIGGER_SOURCES = {
    "INSERT": [("new_rows", 1)],
    "UPDATE": [("new_rows", 1), ("old_rows", -1)],
    "DELETE": [("old_rows", -1)],
}


def install_vector_counters(conn: psycopg.Connection) -> None:
    """(Re)generate the triggers that keep corpus_counters and vector_counters exact.

    Call inside the transaction that changes the set of live models or their columns.
    Only what differs from the database is written: a function whose body is unchanged
    is left alone, and a trigger is created only when missing (its function's name never
    changes), so no lock on ``documents`` is taken when nothing changed.
    """
    versions = registry.live_versions(conn)
    for op, sources in _TRIGGER_SOURCES.items():
        name = f"segue_count_documents_{op.lower()}"
        body = sql.SQL("BEGIN {} RETURN NULL; END").format(_counter_body(sources, versions)).as_string(conn)
        existing = conn.execute("SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)", (f"{name}()",)).fetchone()
        if existing is None or existing[0] != body:
            conn.execute(
                sql.SQL("CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS {body}").format(
                    f=sql.Identifier(name), body=sql.Literal(body))
            )
        trigger = f"documents_count_{op.lower()}"
        if conn.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = 'documents'::regclass AND tgname = %s",
                        (trigger,)).fetchone():
            continue
        referencing = sql.SQL(" ").join(
            sql.SQL("{} TABLE AS {}").format(
                sql.SQL("NEW" if rows == "new_rows" else "OLD"), sql.Identifier(rows)
            )
            for rows, _ in sources
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {t} AFTER {op} ON documents REFERENCING {ref}"
                " FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
            ).format(t=sql.Identifier(trigger), op=sql.SQL(op), ref=referencing, f=sql.Identifier(name))
        )
