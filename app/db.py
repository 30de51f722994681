"""PostgreSQL connections, schema bootstrap and the per-model columns and counters.

Each registered model version N owns two columns on ``documents``:
``embedding_vN vector(dim)`` and ``embedding_vN_sha256 bytea``. The statement-level
triggers that keep ``vector_counters`` exact are generated here from the list of
live models and regenerated whenever that list changes.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from pgvector.psycopg import register_vector, register_vector_async
from psycopg import sql

from app.settings import Settings

BOOTSTRAP_LOCK = 0x5E6E  # advisory lock serializing schema changes across processes


def vector_column(version: int) -> sql.Identifier:
    """The vector column of model version ``version``."""
    return sql.Identifier(f"embedding_v{version}")


def sha_column(version: int) -> sql.Identifier:
    """The column holding the content hash that model version ``version``'s vector was built from."""
    return sql.Identifier(f"embedding_v{version}_sha256")


def _search_path(schema: str) -> sql.Composed:
    return sql.SQL("SELECT set_config('search_path', {}, false)").format(
        sql.Literal(sql.SQL(", ").join([sql.Identifier(schema), sql.Identifier("public")]).as_string(None))
    )


def connect(settings: Settings, url: str) -> psycopg.Connection:
    """Open a connection with Segue's schema on the search_path and pgvector types registered.

    Autocommit: a statement never leaves an idle transaction holding locks that would
    block DDL (registering a model) or CREATE INDEX CONCURRENTLY; writes that belong
    together use ``with conn.transaction():``.
    """
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(_search_path(settings.db_schema))
    register_vector(conn)
    return conn


async def connect_async(settings: Settings, url: str) -> psycopg.AsyncConnection:
    """The async twin of :func:`connect` (autocommit; use ``conn.transaction()`` blocks)."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(_search_path(settings.db_schema))
    await register_vector_async(conn)
    return conn


def bootstrap(settings: Settings, url: str) -> None:
    """Create the pgvector extension, the schema, Segue's tables and the counter triggers."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (BOOTSTRAP_LOCK,))
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(settings.db_schema)))
            conn.execute(_search_path(settings.db_schema))
            with conn.transaction():
                conn.execute(resources.files("schemas").joinpath("schema.sql").read_text())
                install_vector_counters(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (BOOTSTRAP_LOCK,))


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
    """
    versions = live_versions(conn)
    for op, sources in _TRIGGER_SOURCES.items():
        function = sql.Identifier(f"segue_count_documents_{op.lower()}")
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS {body}"
            ).format(
                f=function,
                body=sql.Literal(
                    sql.SQL("BEGIN {} RETURN NULL; END").format(_counter_body(sources, versions)).as_string(conn)
                ),
            )
        )
        referencing = sql.SQL(" ").join(
            sql.SQL("{} TABLE AS {}").format(
                sql.SQL("NEW" if rows == "new_rows" else "OLD"), sql.Identifier(rows)
            )
            for rows, _ in sources
        )
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {t} AFTER {op} ON documents REFERENCING {ref}"
                " FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
            ).format(
                t=sql.Identifier(f"documents_count_{op.lower()}"), op=sql.SQL(op), ref=referencing, f=function
            )
        )
