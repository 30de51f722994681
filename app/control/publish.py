"""``segue publish FILE``: a file of documents onto the document-changes topic, checked against the contract.

JSONL (``.jsonl``, ``.ndjson``), CSV and Parquet files, optionally gzipped (not Parquet).
Each record becomes a document change keyed by its id: its text from one field or several
joined by a blank line, its version from a field or, without one, the time of publication
plus the record's number (so a later line of the same id wins, and publishing the file again
updates what changed). Every change is validated as a worker
will decode it; a bad record is reported with its line (or row) number and not sent. A file
that cannot be read on (a gzip cut short), or a broker that fails, stops the publication at
the line it reached, with what was sent so far.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import math
import re
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from segue.schemas.events import InvalidEvent, decode_change, encode_change

NOT_UTF8 = "not UTF-8"
MAX_RECORD_BYTES = 1_048_576  # the producer's (and Kafka's default) largest record


class PublishRefused(RuntimeError):
    """A file that cannot be published at all: its format needs a library that is not installed, it cannot be
    read, or the broker cannot be reached."""


@dataclass(frozen=True)
class Fields:
    """Which fields of a record hold the id, the text, the version and the metadata."""

    id: str
    text: tuple[str, ...]
    version: str | None = None
    metadata: tuple[str, ...] = ()


@dataclass
class PublishReport:
    """Records sent (acknowledged by the broker), bad records, and where the publication stopped, if it did."""

    sent: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line or row number, why)
    stopped: tuple[int, str] | None = None  # (line or row number, why): it and records after it may not be sent
    seconds: float = 0.0


class _Stopped(Exception):
    """The broker failed to take the record of a line: the publication stops there."""

    def __init__(self, number: int, error: BaseException):
        super().__init__(number, f"the broker failed: {type(error).__name__}: {error}")


def records(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line or row number, record) for each record of the file; a record that cannot be read is a str saying why.

    A JSONL or CSV record is numbered by the line it starts on (a CSV header is line 1),
    a Parquet record by its row, from 1. Bytes that are not UTF-8 make their record bad,
    not the file; a file that cannot be read on (compressed data cut short) ends with a bad
    record at the line it reached.
    """
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow
            import pyarrow.parquet as parquet
        except ImportError:
            raise PublishRefused("Parquet files need pyarrow: pip install 'segue[parquet]'") from None
        try:
            table = parquet.read_table(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise PublishRefused(f"{path.name} cannot be read as Parquet: {error}") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    opener = gzip.open if name.endswith(".gz") else open
    reached = 1  # the line being read
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            if name.removesuffix(".gz").endswith(".csv"):
                csv.field_size_limit(sys.maxsize)  # a long text is refused by the limit on texts, not csv's 128 KiB
                lines = csv.reader(handle)
                header = next(lines, [])
                reached = lines.line_num + 1
                for values in lines:
                    if any(map(_undecodable, values)):
                        yield reached, NOT_UTF8
                    elif len(values) != len(header) and values:
                        yield reached, f"has {len(values)} field(s), the header {len(header)}"
                    elif values:  # not a blank line
                        yield reached, dict(zip(header, values))
                    reached = lines.line_num + 1
                return
            for number, line in enumerate(handle, start=1):
                reached = number + 1
                if not line.strip():
                    continue
                if _undecodable(line):
                    yield number, NOT_UTF8
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))  # a column of this line in a JSON error
                except json.JSONDecodeError as error:
                    yield number, f"not JSON: {error.msg} at column {error.colno}"
                except (ValueError, RecursionError) as error:  # an integer of over 4,300 digits, nesting too deep
                    yield number, f"not JSON: {error}"
                else:  # a JSON string, too, is no record but would read as a reason
                    yield number, record if isinstance(record, dict) else f"not an object but {type(record).__name__}"
    except (OSError, EOFError, zlib.error) as error:
        yield reached, f"the file cannot be read from here on: {error}"


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


def change_of(record: dict[str, Any], fields: Fields, default_version: int, max_text_bytes: int) -> tuple[bytes, bytes]:
    """(key, value) of a record's document change; raises ValueError saying what is wrong with it.

    ``default_version`` is the version of a record without a version field. The change is
    checked as a worker will decode it, and against the largest record a broker takes.
    """
    if not isinstance(record, dict):
        raise ValueError(f"not an object but {type(record).__name__}")
    missing = [f for f in (fields.id, *fields.text) if record.get(f) in (None, "")]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    doc_id = _text(record, fields.id)
    text = "\n\n".join(_text(record, f) for f in fields.text)
    version = default_version
    if fields.version:
        try:
            version = _integer(record[fields.version])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{fields.version} is not an integer: {record.get(fields.version)!r:.80}") from None
    metadata = {f: record[f] for f in fields.metadata if f in record}
    where = _non_finite(metadata)
    if where is not None:
        raise ValueError(f"metadata {where} is not a number JSON can carry (NaN or infinite)")
    try:
        key = doc_id.encode()
        value = encode_change(doc_id, version=version, text=text, metadata=metadata or None)
    except UnicodeEncodeError as error:
        raise ValueError(f"{fields.id} is not text: {error.reason}") from None
    except orjson.JSONEncodeError as error:  # a lone surrogate, an integer beyond 64 bits, Decimal, bytes
        raise ValueError(f"cannot be sent as JSON: {error}") from None
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"the change is {size} bytes, over the {MAX_RECORD_BYTES} a Kafka record may hold")
    try:
        decode_change(key, value, max_text_bytes=max_text_bytes)  # as a worker will
    except InvalidEvent as error:
        raise ValueError(f"{error.reason.value}: {error}") from None
    return key, value


def _text(record: dict[str, Any], name: str) -> str:
    """Field ``name`` as text: a string, or an integer written out; anything else is refused."""
    value = record[name]
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{name} is not a string or an integer but {type(value).__name__}: {value!r:.80}")


def _non_finite(value: Any) -> str | None:
    """The path of the first NaN or infinite float in ``value`` (nested lists and objects), or None."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path
        if isinstance(item, dict):
            stack += [(f"{path}/{key}" if path else str(key), inner) for key, inner in reversed(item.items())]
        elif isinstance(item, (list, tuple)):
            stack += [(f"{path}/{index}", inner) for index, inner in reversed(list(enumerate(item)))]
    return None


def changes(path: Path, fields: Fields, *, published_at: int,
            max_text_bytes: int) -> Iterator[tuple[int, tuple[bytes, bytes] | str]]:
    """(line or row number, the (key, value) of its document change or why it is bad) for each record of ``path``.

    ``published_at`` plus a record's number is its version when it has no version field.
    """
    for number, record in records(path):
        if isinstance(record, str):
            yield number, record
            continue
        try:
            change = change_of(record, fields, published_at + number, max_text_bytes)
        except ValueError as error:
            yield number, str(error)
        else:
            yield number, change


async def publish(path: Path, fields: Fields, *, bootstrap: str, topic: str, max_text_bytes: int,
                  console: Console | None) -> PublishReport:
    """Validate and send every record of ``path``; returns once the broker acknowledged each one sent.

    A broker that cannot be reached is refused (:class:`PublishRefused`); one that fails on the way
    stops the publication, which the report's ``stopped`` says.
    """
    report = PublishReport()
    started = time.perf_counter()
    published_at = time.time_ns() // 1000  # a record's version, without a version field: this plus its number
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_request_size=MAX_RECORD_BYTES)
    try:
        await producer.start()
    except KafkaError as error:
        await producer.stop()
        raise PublishRefused(f"cannot reach the broker at {bootstrap}: {error}") from None
    progress = Progress(TextColumn(f"publish {path.name}"), BarColumn(), MofNCompleteColumn(), console=console,
                        disable=console is None)
    pending: list[tuple[int, asyncio.Future]] = []  # (line, delivery) of records sent, not yet acknowledged
    try:
        with progress:
            task = progress.add_task("publish", total=None)
            for number, change in changes(path, fields, published_at=published_at, max_text_bytes=max_text_bytes):
                if isinstance(change, str):
                    report.bad.append((number, change))
                    continue
                key, value = change
                try:
                    pending.append((number, await producer.send(topic, key=key, value=value)))
                except KafkaError as error:
                    await _acknowledged(pending, report)
                    raise _Stopped(number, error) from None
                if len(pending) >= 1000:
                    await _acknowledged(pending, report)
                    progress.update(task, completed=report.sent)
            await _acknowledged(pending, report)
            progress.update(task, completed=report.sent)
    except _Stopped as stop:
        report.stopped = stop.args
    finally:
        await producer.stop()
    report.seconds = time.perf_counter() - started
    return report


async def _acknowledged(pending: list[tuple[int, asyncio.Future]], report: PublishReport) -> None:
    """Wait for the broker to acknowledge each pending record, counting them sent; raises :class:`_Stopped` at the
    line of the first one it failed."""
    outcomes = await asyncio.gather(*(delivery for _, delivery in pending), return_exceptions=True)
    failed = [(number, outcome) for (number, _), outcome in zip(pending, outcomes)
              if isinstance(outcome, BaseException)]
    report.sent += len(pending) - len(failed)
    pending.clear()
    if failed:
        raise _Stopped(*failed[0])
