"""``segue import``: adopt a corpus (and its vectors) from an existing pgvector table, and follow it."""

from __future__ import annotations

import asyncio

import click
import psycopg

from segue.cli.common import (
    console,
    database,
    kafka,
)
from segue.settings import Settings
from segue.storage import connections


@click.command("import")
@click.option("--source-url", help="the database holding the table [default: Segue's own]")
@click.option("--table", required=True, help="the table: table, schema.table, or a quoted name (\"Items\")")
@click.option("--id-column", required=True, help="its unique id (integer, text or uuid): the documents' doc_id; "
                                                 "of a chunk table, the id of the chunk's document")
@click.option("--text-column", "text_columns", multiple=True, help="its text (several are joined by a blank line)")
@click.option("--text-expression", help="or the text as one SQL expression over the table's columns, evaluated "
                                        "read-only, e.g. \"title || ': ' || body\"")
@click.option("--version-column", help="an integer or timestamp column whose increase means a newer document")
@click.option("--metadata-column", "metadata_columns", multiple=True, help="a column kept in metadata (repeatable)")
@click.option("--chunk-column", help="the rows are chunks: this integer column orders them within their document "
                                    "(documents are rebuilt from their chunks, joined by a blank line)")
@click.option("--chunk-text-column", help="with --chunk-column: the chunk's text")
@click.option("--vector-column", help="a vector column to adopt as --model's vectors (of a chunk table: its chunk "
                                      "vectors), without embedding")
@click.option("--model", help="the name the adopted vectors are registered under")
@click.option("--page-size", default=5000, show_default=True, type=click.IntRange(min=1),
              help="rows per keyset page (the watermark's step)")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="at most this many rows a second (spares the source database)")
@click.option("--follow", is_flag=True, help="then publish the table's changes and deletes until interrupted")
@click.option("--poll-s", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="with --follow: seconds between looks for rows whose version passed the newest published")
@click.option("--reconcile-every-s", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="with --follow: seconds between passes comparing every row with what Segue holds "
                   "(rows the version keyset misses, and the deletes)")
@click.option("--max-delete-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="with --follow: a pass that finds more of the table's documents gone publishes none of its deletes")
@click.pass_obj
def import_command(settings: Settings, source_url: str | None, table: str, id_column: str,
                   text_columns: tuple[str, ...], text_expression: str | None, version_column: str | None,
                   metadata_columns: tuple[str, ...], chunk_column: str | None, chunk_text_column: str | None,
                   vector_column: str | None, model: str | None, page_size: int, rate: float | None, follow: bool,
                   poll_s: float, reconcile_every_s: float, max_delete_fraction: float) -> None:
    """Adopt a corpus that already lives in a table: documents, and optionally their vectors as a model.

    Resumable (a killed import continues after its last page), idempotent (a document
    already stored at the same or a newer version is left alone); reports rows read,
    written and skipped, and why. The table is only read, in read-only transactions.

    A table of chunks (--chunk-column, --chunk-text-column; --id-column names the document)
    becomes documents whose bodies are their chunks joined in order, and its vectors the
    chunk vectors of --model (each document's vector the normalised mean of its chunks').
    """
    from segue.control.importer import FOLLOW_CHUNKS, ImportRefused, Source, check_options, run_import

    def refusal(error: Exception) -> click.ClickException:
        if isinstance(error, psycopg.Error):  # its first line: libpq adds the query's text and a caret below
            return click.ClickException(f"{type(error).__name__}: {str(error).splitlines()[0]}")
        return click.ClickException(str(error))

    if follow and not version_column:
        raise click.UsageError("--follow needs --version-column: it publishes the rows whose version moved")
    url = database(settings)
    source = Source(url=source_url or url, table=table, id_column=id_column, text_columns=text_columns,
                    text_expression=text_expression, version_column=version_column,
                    metadata_columns=metadata_columns, vector_column=vector_column, chunk_column=chunk_column,
                    chunk_text_column=chunk_text_column)
    try:
        check_options(source)
    except ImportRefused as error:
        raise refusal(error) from None
    if follow and source.chunked:
        raise click.ClickException(FOLLOW_CHUNKS)
    with connections.connect(settings, url) as conn:
        try:
            report = run_import(conn, source, model=model, page_size=page_size, rate=rate, console=console)
        except (ImportRefused, psycopg.Error) as error:
            raise refusal(error) from None
        for line in report.lines():
            console.print(line, markup=False)
        if follow:
            console.print(f"following {table}: publishing its changes to {settings.topic_document_changes} "
                          "(Ctrl-C stops)", markup=False)
            try:
                asyncio.run(_follow(settings, conn, source, poll_s=poll_s, reconcile_every_s=reconcile_every_s,
                                    max_delete_fraction=max_delete_fraction, page_size=page_size))
            except (ImportRefused, psycopg.Error) as error:
                raise refusal(error) from None
            except KeyboardInterrupt:
                pass


async def _follow(settings: Settings, conn, source, **pacing: float) -> None:
    from aiokafka import AIOKafkaProducer

    from segue.control.importer import follow

    producer = AIOKafkaProducer(bootstrap_servers=kafka(settings), acks="all", linger_ms=20)
    try:
        await producer.start()
        await follow(conn, source, producer, settings.topic_document_changes, max_text_bytes=settings.max_text_bytes,
                     **pacing)
    finally:
        await producer.stop()
