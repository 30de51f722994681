"""``segue dlq``: list dead letters and replay them once their cause is fixed."""

from __future__ import annotations

import asyncio

import click
from rich.table import Table

from segue.cli.common import (
    console,
    database,
    kafka,
)
from segue.settings import Settings
from segue.storage import connections


@click.group()
def dlq() -> None:
    """Dead letters: list them, replay them once their cause is fixed."""


def _letters(settings: Settings, reason: str | None, since: str | None, doc_id: str | None):
    from datetime import datetime

    from segue.control.dlq import read_letters

    try:
        since_at = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise click.BadParameter(f"{since!r} is not an ISO date or time", param_hint="--since") from None
    if since_at is not None and since_at.tzinfo is None:
        since_at = since_at.astimezone()
    return asyncio.run(read_letters(settings, kafka(settings), reason=reason, since=since_at,
                                    doc_id=doc_id))


LETTER_FILTERS = [
    click.option("--reason", help="only letters with this reason (e.g. unknown_model)"),
    click.option("--since", help="only letters that failed at or after this ISO time (e.g. 2026-11-27T10:00)"),
    click.option("--doc-id", help="only letters of this document (by record key)"),
]


def _with_filters(command):
    for option in reversed(LETTER_FILTERS):
        command = option(command)
    return command


@dlq.command("list")
@_with_filters
@click.pass_obj
def dlq_list(settings: Settings, reason: str | None, since: str | None, doc_id: str | None) -> None:
    """List dead letters, oldest first."""
    from rich.text import Text

    letters = _letters(settings, reason, since, doc_id)
    table = Table(title=f"{settings.topic_dead_letters}: {len(letters)} letter(s)")
    for header in ("at", "letter", "reason", "source", "key", "error"):
        table.add_column(header)
    for letter in letters:  # Text, not markup: keys and errors are the producers' text, "[/x]" included
        table.add_row(f"{letter.failed_at:%Y-%m-%d %H:%M:%S}", letter.coordinates, Text(letter.reason),
                      Text(letter.source), Text((letter.doc_id or "–")[:60]), Text(letter.error[:100]))
    console.print(table)


@dlq.command("replay")
@_with_filters
@click.option("--dry-run", is_flag=True, help="say what would be replayed, replay nothing")
@click.pass_obj
def dlq_replay(settings: Settings, reason: str | None, since: str | None, doc_id: str | None, dry_run: bool) -> None:
    """Re-publish dead-lettered originals to their source topic, each letter once."""
    from segue.control.dlq import replay

    letters = _letters(settings, reason, since, doc_id)
    with connections.connect(settings, database(settings)) as conn:
        report = asyncio.run(replay(settings, conn, kafka(settings), letters, dry_run=dry_run))
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {len(report.replayed)} letter(s); {len(report.already)} replayed before; "
                  f"{len(report.failed_again)} failed again after a replay (fix the cause first); "
                  f"{len(report.truncated)} cannot be replayed (payload cut to fit the topic); "
                  f"{len(report.tombstones)} tombstone(s) not replayed")
    for letter in report.replayed:
        console.print(f"  {letter.coordinates} {letter.reason} → {letter.source_topic} key {letter.doc_id!r}",
                      markup=False)
    for letter in report.tombstones:
        console.print(f"  {letter.coordinates} tombstone of key {letter.doc_id!r}: it has no version, and replayed "
                      "it could delete a later write; publish {\"doc_id\": …, \"op\": \"delete\", \"version\": …} "
                      "instead", markup=False)
