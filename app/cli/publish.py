"""``segue publish``: a file of documents onto the document-changes topic."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from segue.cli.common import (
    console,
    kafka,
)
from segue.settings import Settings


@click.command("publish")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--id-field", help="the field holding the document id [default: id, or _id where the records have "
                                 "_id and no id, as BEIR corpora do]")
@click.option("--text-field", "text_fields", multiple=True, default=("text",), show_default=True,
              help="the field holding the text (repeatable: several are joined by a blank line)")
@click.option("--version-field", help="an integer field; without one, the time of publication is the version")
@click.option("--metadata-field", "metadata_fields", multiple=True, help="a field kept in metadata (repeatable)")
@click.pass_obj
def publish_command(settings: Settings, path: Path, id_field: str | None, text_fields: tuple[str, ...],
                    version_field: str | None, metadata_fields: tuple[str, ...]) -> None:
    """Publish a JSONL, CSV or Parquet file of documents as document changes (each checked first)."""
    from segue.control.publish import Fields, PublishRefused, publish, records
    from segue.worker.topics import ensure_topics

    bootstrap = kafka(settings)
    try:
        if id_field is None:
            first = next((record for _, record in records(path) if isinstance(record, dict)), {})
            id_field = "_id" if "_id" in first and "id" not in first else "id"
        asyncio.run(ensure_topics(settings, bootstrap))
        report = asyncio.run(publish(path, Fields(id_field, text_fields, version_field, metadata_fields),
                                     bootstrap=bootstrap, topic=settings.topic_document_changes,
                                     max_text_bytes=settings.max_text_bytes, console=console))
    except PublishRefused as error:
        raise click.ClickException(str(error)) from None
    console.print(f"sent {report.sent} document change(s) to {settings.topic_document_changes} in "
                  f"{report.seconds:.1f}s; {len(report.bad)} bad record(s) not sent")
    unit = "row" if path.name.lower().endswith(".parquet") else "line"
    for number, why in report.bad:
        console.print(f"  {unit} {number}: {why}", markup=False)
    if report.stopped:
        number, why = report.stopped
        raise click.ClickException(f"stopped at {unit} {number}: {why}; that record and later ones were not all "
                                   "sent: publish the file again once the broker is back")
    if report.bad:
        sys.exit(1)
