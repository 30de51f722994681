"""``segue publish FILE``: a file of documents onto the document-changes topic, checked against the contract.

JSONL (``.jsonl``, ``.ndjson``), CSV and Parquet files, optionally gzipped (not Parquet).
Each record becomes a document change keyed by its id: its text from one field or several
joined by a blank line, its version from a field or, without one, the time of publication
plus the record's number (so a later line of the same id wins, and publishing the file again
updates what changed). Every change is validated as a worker
will decode it; a bad record is reported with its line (or row) number and not sent.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from segue.schemas.events import InvalidEvent, decode_change, encode_change


NOT_UTF8 = "not UTF-8"


class PublishRefused(RuntimeError):
    """A file that cannot be published at all (its format needs a library that is not installed)."""


@dataclass(frozen=True)
class Fields:
    """Which fields of a record hold the id, the text, the version and the metadata."""

    id: str
    text: tuple[str, ...]
    version: str | None = None
    metadata: tuple[str, ...] = ()


@dataclass
class PublishReport:
    sent: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line or row number, why)
    seconds: float = 0.0


def records(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line or row number, record) for each record of the file; a record that cannot be read is a str saying why.

    A JSONL or CSV record is numbered by the line it starts on (a CSV header is line 1),
    a Parquet record by its row, from 1. Bytes that are not UTF-8 make their record bad,
    not the file.
    """
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise PublishRefused("Parquet files need pyarrow: pip install 'segue[parquet]'") from None
        yield from enumerate(parquet.read_table(path).to_pylist(), start=1)
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        if name.removesuffix(".gz").endswith(".csv"):
            lines = csv.reader(handle)
            header = next(lines, [])
            starts_on = lines.line_num + 1
            for values in lines:
                if any(map(_undecodable, values)):
                    yield starts_on, NOT_UTF8
                elif len(values) != len(header) and values:
                    yield starts_on, f"has {len(values)} field(s), the header {len(header)}"
                elif values:  # not a blank line
                    yield starts_on, dict(zip(header, values))
                starts_on = lines.line_num + 1
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if _undecodable(line):
                yield number, NOT_UTF8
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield number, f"not JSON: {error}"


def _undecodable(text: str) -> bool:
    """Whether text read with ``surrogateescape`` held bytes that are not UTF-8."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def _integer(value: Any) -> int:
    """``value`` as an integer when it is one (an int, an integral float, or a string of digits); else ValueError."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    if isinstance(value, str):
        if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            raise ValueError
    return int(value)


def change_of(record: dict[str, Any], fields: Fields, default_version: int, max_text_bytes: int) -> tuple[str, bytes]:
    """(key, value) of a record's document change; raises ValueError saying what is wrong with it.

    ``default_version`` is the version of a record without a version field.
    """
    if not isinstance(record, dict):
        raise ValueError(f"not an object but {type(record).__name__}")
    missing = [f for f in (fields.id, *fields.text) if record.get(f) in (None, "")]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    doc_id = str(record[fields.id])
    text = "\n\n".join(str(record[f]) for f in fields.text)
    version = default_version
    if fields.version:
        try:
            version = _integer(record[fields.version])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{fields.version} is not an integer: {record.get(fields.version)!r}") from None
    metadata = {f: record[f] for f in fields.metadata if f in record}
    value = encode_change(doc_id, version=version, text=text, metadata=metadata or None)
    try:
        decode_change(doc_id.encode(), value, max_text_bytes=max_text_bytes)  # as a worker will
    except InvalidEvent as error:
        raise ValueError(f"{error.reason.value}: {error}") from None
    return doc_id, value


async def publish(path: Path, fields: Fields, *, bootstrap: str, topic: str, max_text_bytes: int,
                  console: Console | None) -> PublishReport:
    """Validate and send every record of ``path``; returns once the broker acknowledged each one sent."""
    report = PublishReport()
    started = time.perf_counter()
    published_at = time.time_ns() // 1000  # a record's version, without a version field: this plus its number
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    progress = Progress(TextColumn(f"publish {path.name}"), BarColumn(), MofNCompleteColumn(), console=console,
                        disable=console is None)
    try:
        with progress:
            task = progress.add_task("publish", total=None)
            deliveries = []
            for number, record in records(path):
                try:
                    if isinstance(record, str):
                        raise ValueError(record)
                    key, value = change_of(record, fields, published_at + number, max_text_bytes)
                except ValueError as error:
                    report.bad.append((number, str(error)))
                    continue
                deliveries.append(await producer.send(topic, key=key.encode(), value=value))
                if len(deliveries) >= 1000:
                    report.sent += await _acknowledged(deliveries)
                    progress.update(task, completed=report.sent)
            report.sent += await _acknowledged(deliveries)
            progress.update(task, completed=report.sent)
    finally:
        await producer.stop()
    report.seconds = time.perf_counter() - started
    return report


async def _acknowledged(deliveries: list) -> int:
    count = len(deliveries)
    await asyncio.gather(*deliveries)
    deliveries.clear()
    return count
