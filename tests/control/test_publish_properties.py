"""Properties of ``segue publish`` for any file a user can hand it (Hypothesis).

JSONL and CSV files, plain or gzipped, with or without a byte order mark, LF or CRLF, whose
lines mix good documents with hostile ones: integers beyond 64 bits, NaN and infinite numbers,
nested metadata, lone surrogates, NUL characters, bytes that are not UTF-8, blank lines,
missing or empty fields, lines that are not objects or not JSON, texts over the limit,
duplicate ids. Every record is either sent, and decodes with ``decode_change`` exactly as the
record says (doc_id, text, version, metadata), or reported with its line and a reason; the
records sent and reported add up to the records in the file; nothing raises. Most examples
check the records' changes without a broker (:func:`segue.control.publish.changes`, what ``publish``
sends); a few whole files go through ``publish`` to the embedded broker, and exactly their
good records land on the topic.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import math
import re
import string
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segue.control.publish import Fields, changes, publish
from segue.schemas.events import decode_change
from segue.worker.topics import ensure_topics

LIMIT = 4000  # the harness's max_text_bytes
PUBLISHED_AT = 1_767_225_600_000_000  # µs; a record without a version field gets this plus its line number
WITH_VERSION = Fields("id", ("title", "body"), "v", ("lang", "meta"))
WITHOUT_VERSION = Fields("id", ("title", "body"), None, ("lang", "meta"))
CSV_HEADER = ["id", "title", "body", "v", "lang", "meta"]
PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ---------------------------------------------------------------------------------
plain = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=8)
fragments = st.sampled_from(["\ud800", "\udfff", "\x00", "\ufeff", "é", "\u2028", "\x85", '"', ",", "\n", "\r",
                             "\t", " ", "\\", "😀", "{"])
hostile = st.lists(st.text(max_size=4) | fragments, max_size=4).map("".join)
texts = plain | hostile | st.just("x" * (LIMIT + 1))
ids = (plain | st.sampled_from(["doc-1", "doc-2"]) | hostile | st.integers(-(2**70), 2**70) | st.just("i" * 513)
       | st.none() | st.just("") | st.booleans() | st.floats() | st.lists(st.integers(), max_size=2))
versions = (st.integers(0, 2**63 - 1) | st.integers(-(2**70), 2**70) | st.integers(0, 2**64).map(str)
            | st.floats() | st.booleans() | st.none() | hostile)
numbers = (st.integers(-(2**70), 2**70) | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
           | st.floats())  # NaN and infinities among them
json_values = st.recursive(st.none() | st.booleans() | numbers | hostile,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile, inner, max_size=3),
                           max_leaves=6)
good_records = st.fixed_dictionaries({"id": plain | st.sampled_from(["doc-1", "doc-2"]), "title": plain,
                                      "body": plain, "v": st.integers(0, 2**63 - 1)}, optional={"lang": plain})
any_records = st.fixed_dictionaries({}, optional={"id": ids, "title": texts, "body": texts, "v": versions,
                                                  "lang": json_values, "meta": json_values, "extra": json_values})
# Lines no reader can take as a document: malformed JSON, NUL, bytes that are not UTF-8, nesting or an integer
# Python's parser refuses, and values orjson cannot write or would write as something else.
GARBAGE = [b'{"id": "x", "title": ', b"{", b"nope", b"{'id': 'x'}", b'{"id": "x",}', b"\x00", b"\xff",
           b'{"id": "caf\xe9", "title": "t", "body": "b", "v": 1}', b"[" * 5000, b"1" * 5000,
           b'{"id": "a"} {"id": "b"}', b'{"id": "n", "title": "t", "body": "b", "v": 1, "lang": NaN}',
           b'{"id": "inf", "title": "t", "body": "b", "v": 1, "lang": 1e400}',
           b'{"id": "nan", "title": "t", "body": "b", "v": 1, "meta": [NaN]}',
           b'{"id": "big", "title": "t", "body": "b", "v": 1, "lang": 18446744073709551616}',
           b'{"id": "\\ud800", "title": "t", "body": "b", "v": 1}',
           b'{"id": "s", "title": "\\udfff", "body": "b", "v": 1}']
jsonl_lines = st.one_of(
    st.tuples(st.just("record"), good_records | any_records, st.booleans()),  # (kind, value, \\u escapes)
    st.tuples(st.just("record"), json_values, st.booleans()),  # any JSON: arrays, numbers, strings
    st.tuples(st.just("garbage"), st.sampled_from(GARBAGE), st.just(True)),
    st.tuples(st.just("blank"), st.sampled_from(["", " ", "\t", " \t "]), st.just(True)),
)
csv_fragments = st.sampled_from(["\udcff", "\x00", "\ufeff", "é", "\u2028", '"', ",", "\n", "\r", "\r\n", " ", "😀"])
csv_cells = (plain | st.integers(-5, 2**64).map(str) | st.just("")
             | st.sampled_from(["x" * (LIMIT + 1), "y" * 140_000])  # over the limit; over csv's own 128 KiB
             | st.lists(st.text(max_size=4) | csv_fragments, max_size=4).map("".join))  # "\udcff": the byte 0xFF
csv_rows = st.one_of(
    st.tuples(st.just("row"), st.fixed_dictionaries({"id": plain, "title": plain, "body": plain,
                                                     "v": st.integers(0, 2**63 - 1).map(str), "lang": plain,
                                                     "meta": plain}).map(lambda row: list(row.values()))),
    st.tuples(st.just("row"), st.lists(csv_cells, min_size=len(CSV_HEADER), max_size=len(CSV_HEADER))),
    st.tuples(st.just("row"), st.lists(csv_cells, min_size=1, max_size=len(CSV_HEADER) + 1)),
    st.tuples(st.just("blank"), st.just([])),
)
layouts = st.fixed_dictionaries({"crlf": st.booleans(), "bom": st.booleans(), "gzip": st.booleans(),
                                 "final_newline": st.booleans()})


# -- files and what they say ----------------------------------------------------------------------
def jsonl_file(folder: Path, lines: list[tuple[str, Any, bool]], layout: dict) -> tuple[Path, dict[int, tuple | None]]:
    """The file of ``lines``, and per line holding a record, the change it says (None: it says none a worker
    can store, so it must be reported)."""
    encoded, says = [], {}
    for number, (kind, value, escaped) in enumerate(lines, start=1):
        if kind == "blank":
            encoded.append(value.encode())
        elif kind == "garbage":
            encoded.append(value)
            says[number] = None
        else:
            text = json.dumps(value, ensure_ascii=escaped)
            encoded.append(text.encode("utf-8", "surrogatepass"))  # a raw lone surrogate is not UTF-8
            says[number] = None if _has_surrogate(text) else value
    data = (b"\r\n" if layout["crlf"] else b"\n").join(encoded) + (b"\n" if layout["final_newline"] else b"")
    return _written(folder / "documents.jsonl", data, layout), says


def csv_file(folder: Path, rows: list[tuple[str, list[str]]], layout: dict) -> tuple[Path, dict[int, tuple | None]]:
    """The CSV of ``rows`` after the header, and per row the record it says (None when it must be reported)."""
    ending = "\r\n" if layout["crlf"] else "\n"
    buffer = io.StringIO(newline="")
    # Ending lines in LF, Python's writer leaves a field with a lone CR unquoted: a file that says something else.
    writer = csv.writer(buffer, lineterminator=ending, quoting=csv.QUOTE_MINIMAL if layout["crlf"] else csv.QUOTE_ALL)
    writer.writerow(CSV_HEADER)
    says, number = {}, 2  # the line the next row starts on
    for kind, cells in rows:
        start = buffer.tell()
        if kind == "blank":
            buffer.write(ending)
        else:
            writer.writerow(cells)
            fits = len(cells) == len(CSV_HEADER) and not any("\udcff" in cell for cell in cells)
            says[number] = dict(zip(CSV_HEADER, cells)) if fits else None
        number += len(re.findall(r"\r\n|\r|\n", buffer.getvalue()[start:]))
    data = buffer.getvalue()
    if not layout["final_newline"]:
        data = data.removesuffix(ending)
    return _written(folder / "documents.csv", data.encode("utf-8", "surrogateescape"), layout), says


def _written(path: Path, data: bytes, layout: dict) -> Path:
    data = (b"\xef\xbb\xbf" if layout["bom"] else b"") + data
    if layout["gzip"]:
        path, data = path.with_name(path.name + ".gz"), gzip.compress(data)
    path.write_bytes(data)
    return path


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def change_said(record: Any, fields: Fields, number: int) -> tuple | None:
    """(doc_id, text, version, metadata) that ``record`` on line ``number`` says, or None when it says no change
    a worker can store: a missing or empty id or text, one that is no string or integer, a version that is no
    integer of 0 to 2^63 − 1, a text over the limit, an id over 512 characters, a NUL character or a lone
    surrogate, a NaN or infinite number, an integer beyond 64 bits."""
    if not isinstance(record, dict):
        return None
    parts = []
    for name in (fields.id, *fields.text):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            return None
        parts.append(str(value))
    doc_id, text = parts[0], "\n\n".join(parts[1:])
    version = PUBLISHED_AT + number if fields.version is None else _integer(record.get(fields.version))
    metadata = {name: record[name] for name in fields.metadata if name in record}
    if version is None or not 0 <= version <= 2**63 - 1 or len(doc_id) > 512:
        return None
    if not _storable([doc_id, text, metadata]) or len(text.encode()) > LIMIT:
        return None
    return doc_id, text, version, metadata


def _integer(value: Any) -> int | None:
    """A version field as the contract reads it: an integer, an integral float, or a string of digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        return int(value)
    return None


def _storable(value: Any) -> bool:
    """Whether JSON carries ``value`` as it is and PostgreSQL stores it: no NUL, no lone surrogate, no NaN or
    infinity, no integer beyond 64 bits."""
    if isinstance(value, dict):
        return all(_storable(key) and _storable(inner) for key, inner in value.items())
    if isinstance(value, list):
        return all(map(_storable, value))
    if isinstance(value, str):
        return "\x00" not in value and not _has_surrogate(value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**64
    return True


def canonical(change: tuple) -> str:
    """A change as JSON text, so 1 and 1.0 (or True) differ."""
    return json.dumps(change, sort_keys=True)


def check_changes(path: Path, says: dict[int, Any], fields: Fields) -> list[tuple[bytes, bytes]]:
    """Assert the boundary's promise on every record of ``path``; the (key, value) of each one sent."""
    outcomes = list(changes(path, fields, published_at=PUBLISHED_AT, max_text_bytes=LIMIT))
    assert [number for number, _ in outcomes] == sorted(says)  # each record once, by its line
    sent = []
    for number, outcome in outcomes:
        said = None if says[number] is None else change_said(says[number], fields, number)
        if isinstance(outcome, str):
            assert outcome.strip() and said is None, (number, outcome, said)
            continue
        key, value = outcome
        change = decode_change(key, value, max_text_bytes=LIMIT)
        assert said is not None, (number, change)
        assert canonical((change.doc_id, change.text, change.version, change.metadata)) == canonical(said)
        assert key == change.doc_id.encode() and change.op == "upsert"
        sent.append(outcome)
    return sent


# -- the records of a file, without a broker -----------------------------------------------------------
@PROPERTY
@given(lines=st.lists(jsonl_lines, max_size=12), layout=layouts, versioned=st.booleans())
def test_every_jsonl_record_is_sent_as_it_says_or_reported_by_its_line(lines, layout, versioned):
    with tempfile.TemporaryDirectory() as folder:
        path, says = jsonl_file(Path(folder), lines, layout)
        check_changes(path, says, WITH_VERSION if versioned else WITHOUT_VERSION)


@PROPERTY
@given(rows=st.lists(csv_rows, max_size=10), layout=layouts, versioned=st.booleans())
def test_every_csv_row_is_sent_as_it_says_or_reported_by_the_line_it_starts_on(rows, layout, versioned):
    with tempfile.TemporaryDirectory() as folder:
        path, says = csv_file(Path(folder), rows, layout)
        check_changes(path, says, WITH_VERSION if versioned else WITHOUT_VERSION)


def test_a_gzip_cut_short_sends_what_it_holds_and_reports_the_line_it_stopped_at(tmp_path):
    """The lines before the cut are records like any others; the line the cut falls in is reported, not a crash."""
    lines = [json.dumps({"id": f"doc-{n}", "title": "T", "body": f"line {n} " + "x" * 200, "v": n}) for n in range(400)]
    whole = gzip.compress("\n".join(lines).encode())
    path = tmp_path / "documents.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    outcomes = list(changes(path, WITH_VERSION, published_at=PUBLISHED_AT, max_text_bytes=LIMIT))
    *records, (last, why) = outcomes
    assert [number for number, _ in records] == list(range(1, last)) and 1 < last < 400
    assert all(not isinstance(outcome, str) for _, outcome in records)
    assert why.startswith("the file cannot be read from here on: ")


# -- whole files, to the embedded broker --------------------------------------------------------------
@settings(max_examples=4, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=st.lists(jsonl_lines, min_size=1, max_size=12), layout=layouts)
def test_publish_lands_exactly_the_good_records_of_a_file_on_the_topic(harness, lines, layout):
    topic = f"publish-properties-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(harness.settings.model_copy(update={"topic_document_changes": topic}),
                              harness.bootstrap))
    with tempfile.TemporaryDirectory() as folder:
        path, says = jsonl_file(Path(folder), lines, layout)
        expected = check_changes(path, says, WITH_VERSION)
        report = asyncio.run(publish(path, WITH_VERSION, bootstrap=harness.bootstrap, topic=topic,
                                     max_text_bytes=LIMIT, console=None))
    assert report.stopped is None and report.sent == len(expected)
    assert report.sent + len(report.bad) == len(says)
    assert [number for number, _ in report.bad] == sorted(n for n, outcome in says.items()
                                                          if change_said(outcome, WITH_VERSION, n) is None)
    assert Counter(on_topic(harness, topic, len(expected))) == Counter(expected)


def on_topic(harness, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) of every record on ``topic``, once ``count`` have arrived (and no more follow)."""

    async def read() -> list[tuple[bytes, bytes]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=harness.bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            records: list[tuple[bytes, bytes]] = []
            for _ in range(60):
                batches = await consumer.getmany(timeout_ms=500)
                records += [(r.key, r.value) for batch in batches.values() for r in batch]
                if len(records) >= count and not batches:
                    break
            return records
        finally:
            await consumer.stop()

    return asyncio.run(read())


def test_a_json_string_on_a_line_is_reported_as_no_object_not_as_its_own_reason(tmp_path):
    """A line holding the JSON string "oops" (or "") is not a record: reported as such, not with "oops" as why."""
    path = tmp_path / "documents.jsonl"
    path.write_text('"oops"\n""\n', encoding="utf-8")
    assert list(changes(path, WITH_VERSION, published_at=PUBLISHED_AT, max_text_bytes=LIMIT)) == [
        (1, "not an object but str"), (2, "not an object but str")]
