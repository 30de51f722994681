"""Connections to PostgreSQL: Segue's schema on the search_path, pgvector's types registered, autocommit; binary COPY."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from pgvector.psycopg import register_vector, register_vector_async
from psycopg import sql

from segue.settings import Settings


def _search_path(schema: str) -> sql.Composed:
    return sql.SQL("SELECT set_config('search_path', {}, false)").format(
        sql.Literal(sql.SQL(", ").join([sql.Identifier(schema), sql.Identifier("public")]).as_string(None))
    )


def connect(settings: Settings, url: str, *, read_only: bool = False) -> psycopg.Connection:
    """Open a connection with Segue's schema on the search_path and pgvector types registered.

    Autocommit: a statement never leaves an idle transaction holding locks that would
    block DDL (registering a model) or CREATE INDEX CONCURRENTLY; writes that belong
    together use ``with conn.transaction():``. A ``read_only`` session cannot write at all.
    """
    conn = psycopg.connect(url, autocommit=True)
    configure(conn, settings)
    if read_only:
        conn.execute("SET default_transaction_read_only = on")
    return conn


def configure(conn: psycopg.Connection, settings: Settings) -> None:
    """Put Segue's schema on a connection's search_path and register pgvector's types (pools use this too)."""
    conn.execute(_search_path(settings.db_schema))
    register_vector(conn)


def connect_plain(settings: Settings, url: str) -> psycopg.Connection:
    """An autocommit connection with Segue's schema on the search_path (works before pgvector exists)."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(_search_path(settings.db_schema))
    return conn


async def connect_async(settings: Settings, url: str) -> psycopg.AsyncConnection:
    """The async twin of :func:`connect` (autocommit; use ``conn.transaction()`` blocks)."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(_search_path(settings.db_schema))
    await register_vector_async(conn)
    return conn


async def copy_binary(conn: psycopg.AsyncConnection, table: str, columns: Sequence[tuple[str, str]],
                      rows: Iterable[Sequence[Any]]) -> None:
    """Stream ``rows`` into ``table`` with a binary COPY; ``columns`` are (name, PostgreSQL type) pairs."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns)
    )
    async with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types([type_name for _, type_name in columns])
        for row in rows:
            await copy.write_row(row)
