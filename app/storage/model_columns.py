"""The columns each registered model owns on ``documents``, and the triggers that keep the counters exact.

Each registered model version N owns two columns on ``documents``:
``embedding_vN vector(dim)`` and ``embedding_vN_sha256 bytea``. The statement-level
triggers that keep ``vector_counters`` exact are generated here from the list of
live models and regenerated whenever that list changes.
"""

from __future__ import annotations

import psycopg
from psycopg import sql


def vector_column(version: int) -> sql.Identifier:
    """The vector column of model version ``version``."""
    return sql.Identifier(f"embedding_v{version}")


def index_name(version: int) -> sql.Identifier:
    """The HNSW index on model version ``version``'s column."""
    return sql.Identifier(f"documents_embedding_v{version}_hnsw")


def sha_column(version: int) -> sql.Identifier:
    """The column holding the content hash that model version ``version``'s vector was built from."""
    return sql.Identifier(f"embedding_v{version}_sha256")


def live_versions(conn: psycopg.Connection) -> list[int]:
    """Versions of the models that are not retired, oldest first."""
    rows = conn.execute("SELECT version FROM embedding_models WHERE state = 'live' ORDER BY version").fetchall()
    return [row[0] for row in rows]


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
    versions = live_versions(conn)
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
