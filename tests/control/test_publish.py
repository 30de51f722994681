"""``segue publish FILE``: files of documents onto the document-changes topic, as a user runs it.

The bundled SciFact corpus (``segue/devtools/data/scifact/corpus.jsonl.gz``, the copy of
``../shared/data/scifact``) is published by the installed ``segue`` and embedded by the session's
real worker with every live model. JSONL, CSV and Parquet files with malformed rows publish exactly
their good records (read back from the topic) and name each bad line or row with its reason; the
exit status is 1 when a record was bad and 0 when none was.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
import time
import uuid
from decimal import Decimal
from importlib import resources

import orjson
import pyarrow
import pyarrow.parquet as parquet
from aiokafka import AIOKafkaConsumer
from psycopg import sql

from segue.control import registry
from segue.storage import connections, model_columns
from tests.harness import free_port, wait_for

SCIFACT = resources.files("segue.devtools").joinpath("data/scifact/corpus.jsonl.gz")


# -- the topic ------------------------------------------------------------------------------
def records_on(harness, topic: str) -> dict[str, dict]:
    """Every record on ``topic`` (one the test's command alone wrote to): its value by its key."""

    async def read() -> dict[str, dict]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=harness.bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            records: dict[str, dict] = {}
            while batches := await consumer.getmany(timeout_ms=1500 if not records else 500):
                for record in (r for batch in batches.values() for r in batch):
                    assert record.key.decode() not in records, f"{record.key} was sent twice"
                    records[record.key.decode()] = orjson.loads(record.value)
            return records
        finally:
            await consumer.stop()

    return asyncio.run(read())


# -- the command ----------------------------------------------------------------------------
def publish(harness, path, *options: str, topic: str | None = None) -> tuple[int, str, dict[int, str]]:
    """Run ``segue publish PATH OPTIONS`` (to ``topic`` instead of the workers' one if given): its exit status,
    its output and the bad lines it named (reason by number)."""
    env = {**harness.env, "SEGUE_TOPIC_DOCUMENT_CHANGES": topic} if topic else None
    done = harness.segue("publish", str(path), *options, env=env, check=False)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    bad_lines = re.findall(r"^\s*(?:line|row) (\d+): (.*)$", done.stdout, re.M)
    named = {int(number): why.strip() for number, why in bad_lines}
    return done.returncode, output, named


def summary(output: str) -> tuple[str, int, int]:
    """(topic, sent, bad) as the command's summary line states them."""
    found = re.search(r"sent (\d+) document change\(s\) to (\S+) in [0-9.]+s; (\d+) bad record\(s\) not sent",
                      " ".join(output.split()))
    assert found, output
    return found[2], int(found[1]), int(found[3])


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


FIELDS = ("--id-field", "id", "--text-field", "title", "--text-field", "body", "--version-field", "v",
          "--metadata-field", "lang")


# -- the SciFact corpus ---------------------------------------------------------------------
SCIFACT_ARGS = ("--id-field", "_id", "--text-field", "title", "--text-field", "text")
SUBSET = 300  # lines of the corpus file the worker embeds: the tiny models take ~85 s on two cores for all 5,183


def scifact_lines() -> list[str]:
    with SCIFACT.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return list(lines)


def expected_of(lines: list[str], limit: int) -> tuple[dict[str, str], dict[int, str]]:
    """The text of each record that fits ``limit`` bytes by its id, and the reason each other one is bad by line."""
    texts, too_long = {}, {}
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        text = f"{record['title']}\n\n{record['text']}"
        if len(text.encode()) > limit:
            too_long[number] = f"text_too_large: text is {len(text.encode())} bytes, over the limit of {limit}"
        else:
            texts[str(record["_id"])] = text
    return texts, too_long


def test_every_record_of_the_bundled_scifact_corpus_is_checked_and_sent_at_the_time_of_publication(harness):
    """All 5,183 abstracts of the real file are parsed; each one within the harness's text limit (4,000 bytes)
    reaches the topic as title + blank line + text at the time of publication in µs plus its line number; the few
    longer ones are named by line as a worker would refuse them, and the command exits 1."""
    texts, too_long = expected_of(scifact_lines(), harness.settings.max_text_bytes)
    assert len(texts) + len(too_long) == 5183 and 0 < len(too_long) < 100
    topic = uid("publish-test")
    before = time.time_ns() // 1000
    with resources.as_file(SCIFACT) as path:
        status, output, named = publish(harness, path, *SCIFACT_ARGS, topic=topic)
    after = time.time_ns() // 1000
    assert status == 1 and named == too_long, output
    assert summary(output) == (topic, len(texts), len(too_long))
    sent = records_on(harness, topic)
    assert {key: value["text"] for key, value in sent.items()} == texts
    assert all(value["doc_id"] == key and value["op"] == "upsert" and "metadata" not in value
               for key, value in sent.items())
    line_of = {str(json.loads(line)["_id"]): number for number, line in enumerate(scifact_lines(), start=1)}
    published_at = {value["version"] - line_of[key] for key, value in sent.items()}  # version = that + line number
    assert len(published_at) == 1 and before <= published_at.pop() <= after


def test_scifact_abstracts_published_to_the_workers_are_embedded_with_every_live_model(harness, worker, tmp_path):
    """The first 300 lines of the real corpus file, copied as they are (the whole file is slow to embed; the test
    above parses all of it), are stored with their text and a current vector of every live model."""
    lines = scifact_lines()[:SUBSET]
    texts, too_long = expected_of(lines, harness.settings.max_text_bytes)
    path = tmp_path / "scifact-head.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(lines)
    status, output, named = publish(harness, path, *SCIFACT_ARGS)
    assert status == (1 if too_long else 0) and named == too_long, output
    assert summary(output) == (harness.settings.topic_document_changes, len(texts), len(too_long))

    ids = list(texts)
    with connections.connect(harness.settings, harness.database_url) as conn:
        models = registry.live_models(conn)
    assert len(models) >= 2  # the old static and the new transformer model, at least
    embedded_by_all = sql.SQL("SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND {}").format(
        sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL AND {} = content_sha256").format(
            model_columns.vector_column(m.version), model_columns.sha_column(m.version)) for m in models))
    wait_for(lambda: harness.scalar(embedded_by_all, (ids,)) == len(ids), timeout=300, interval=0.5,
             what=f"{len(ids)} SciFact abstracts embedded by every live model")
    stored = {doc_id: (body, bytes(content)) for doc_id, body, content in harness.sql(
        "SELECT doc_id, body, content_sha256 FROM documents WHERE doc_id = ANY(%s)", (ids,))}
    assert stored == {doc_id: (text, hashlib.sha256(text.encode()).digest()) for doc_id, text in texts.items()}


# -- malformed files ------------------------------------------------------------------------
def sent(doc_id: str, version: int, text: str, lang: str) -> dict:
    """A document change as the contract has it on the topic."""
    return {"doc_id": doc_id, "op": "upsert", "version": version, "text": text, "metadata": {"lang": lang}}


def publishes_only_the_good(harness, path, *, bad: dict[int, str], good: list[dict]) -> None:
    """``segue publish path`` exits 1, names exactly ``bad`` (line or row: why) and sends exactly ``good``."""
    topic = uid("publish-test")
    status, output, named = publish(harness, path, *FIELDS, topic=topic)
    assert status == 1, output
    assert summary(output) == (topic, len(good), len(bad))
    assert named == bad, output
    assert records_on(harness, topic) == {change["doc_id"]: change for change in good}


def test_a_jsonl_file_with_malformed_lines_publishes_exactly_the_good_ones_and_names_each_bad_line(harness, tmp_path):
    """Not JSON, no id, a version that is no integer, a JSON array and a text over the limit are named by line;
    a blank line is skipped, not bad; the three good records reach the topic as the contract has them."""
    p = uid("jsonl")
    lines = [
        json.dumps({"id": f"{p}-1", "title": "Tau", "body": "Tangles spread.", "v": 3, "lang": "en"}),  # 1
        '{"id": "broken", "title": ',  # 2
        json.dumps({"title": "No id", "body": "here", "v": 1}),  # 3
        json.dumps({"id": f"{p}-4", "title": "Late", "body": "soon", "v": "soon"}),  # 4
        "",  # 5: blank
        "[1, 2]",  # 6
        json.dumps({"id": f"{p}-7", "title": "Long", "body": "x" * harness.settings.max_text_bytes, "v": 1}),  # 7
        json.dumps({"id": f"{p}-8", "title": "Ribosomes", "body": "Translate mRNA.", "v": "12"}),  # 8
        "   ",  # 9: blank
        json.dumps({"id": f"{p}-10", "title": "Ünïcode", "body": "naïve café", "v": 9_000_000_000_000}),  # 10
    ]
    path = tmp_path / "documents.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    topic = uid("publish-test")
    status, output, named = publish(harness, path, *FIELDS, topic=topic)
    assert status == 1, output
    assert summary(output) == (topic, 3, 5)
    assert sorted(named) == [2, 3, 4, 6, 7], output
    assert named[2].startswith("not JSON: ")
    assert named[3] == "no id"
    assert named[4] == "v is not an integer: 'soon'"
    assert named[6] == "not an object but list"
    limit = harness.settings.max_text_bytes
    assert named[7] == f"text_too_large: text is {limit + 6} bytes, over the limit of {limit}"  # "Long\n\n" + body
    assert records_on(harness, topic) == {
        f"{p}-1": {"doc_id": f"{p}-1", "op": "upsert", "version": 3, "text": "Tau\n\nTangles spread.",
                   "metadata": {"lang": "en"}},
        f"{p}-8": {"doc_id": f"{p}-8", "op": "upsert", "version": 12, "text": "Ribosomes\n\nTranslate mRNA."},
        f"{p}-10": {"doc_id": f"{p}-10", "op": "upsert", "version": 9_000_000_000_000,
                    "text": "Ünïcode\n\nnaïve café"},
    }


def test_a_fractional_or_boolean_version_is_a_bad_line_not_truncated(harness, tmp_path):
    """The contract's version is an integer (a worker refuses 5.0): 2.5 and true are bad lines, not versions 2 and 1."""
    p = uid("jsonl-version")
    path = tmp_path / "documents.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"{p}-{n}", "title": "T", "body": "B", "v": v})
                              for n, v in enumerate([2.5, True, 3], start=1)) + "\n", encoding="utf-8")
    topic = uid("publish-test")
    status, output, named = publish(harness, path, *FIELDS, topic=topic)
    assert status == 1 and sorted(named) == [1, 2], output
    assert list(records_on(harness, topic)) == [f"{p}-3"]


def test_a_line_that_is_not_utf8_is_named_and_the_lines_after_it_are_still_sent(harness, tmp_path):
    """A Latin-1 line among UTF-8 ones is a bad line like any other, not the end of the command."""
    p = uid("jsonl-bytes")
    path = tmp_path / "documents.jsonl"
    path.write_bytes(json.dumps({"id": f"{p}-1", "title": "T", "body": "B"}).encode() + b"\n"
                     + b'{"id": "latin-1", "title": "caf\xe9", "body": "B"}\n'
                     + json.dumps({"id": f"{p}-3", "title": "T", "body": "B"}).encode() + b"\n")
    topic = uid("publish-test")
    status, output, named = publish(harness, path, "--id-field", "id", "--text-field", "title", "--text-field",
                                    "body", topic=topic)
    assert status == 1 and sorted(named) == [2], output
    assert sorted(records_on(harness, topic)) == [f"{p}-1", f"{p}-3"]


def test_a_csv_file_with_malformed_rows_names_them_by_line_counting_the_header_as_line_1(harness, tmp_path):
    """A row without its id, one whose version is no integer and one cut short are named by their line
    (the header is line 1); a blank line is skipped; the two good rows reach the topic."""
    p = uid("csv")
    path = tmp_path / "documents.csv"
    path.write_text(
        "id,title,body,v,lang\n"  # 1
        f"{p}-a,Insulin,\"Lowers glucose, mostly.\",5,en\n"  # 2
        ",No id,here,1,en\n"  # 3
        f"{p}-c,Late,soon,soon,en\n"  # 4
        f"{p}-d\n"  # 5: cut short
        "\n"  # 6: blank
        f"{p}-f,Kinase,Adds phosphate.,7,de\n",  # 7
        encoding="utf-8")
    publishes_only_the_good(harness, path, bad={3: "no id", 4: "v is not an integer: 'soon'",
                                                5: "has 1 field(s), the header 5"},
                            good=[sent(f"{p}-a", 5, "Insulin\n\nLowers glucose, mostly.", "en"),
                                  sent(f"{p}-f", 7, "Kinase\n\nAdds phosphate.", "de")])


def test_csv_line_numbers_stay_right_after_a_blank_line_and_a_multi_line_field(harness, tmp_path):
    """The bad row is on line 6 of the file: after a blank line (3) and a quoted text over two lines (4-5)."""
    p = uid("csv-lines")
    path = tmp_path / "documents.csv"
    path.write_text("id,title,body,v,lang\n"
                    f"{p}-a,One,first,1,en\n"
                    "\n"
                    f"{p}-b,Two,\"a text\nover two lines\",2,en\n"
                    f"{p}-c,Three,third,soon,en\n", encoding="utf-8")
    status, output, named = publish(harness, path, *FIELDS, topic=uid("publish-test"))
    assert status == 1 and named == {6: "v is not an integer: 'soon'"}, output


def test_a_parquet_file_with_malformed_rows_names_them_by_row_number(harness, tmp_path):
    """Rows are numbered from 1: a row without its id, one without a title and one whose version is no
    integer are named; the two good rows reach the topic."""
    p = uid("parquet")
    path = tmp_path / "documents.parquet"
    parquet.write_table(pyarrow.table({
        "id": [f"{p}-1", None, f"{p}-3", f"{p}-4", f"{p}-5"],
        "title": ["Actin", "No id", "", "Late", "Myosin"],
        "body": ["Forms filaments.", "here", "untitled", "soon", "Walks on actin."],
        "v": ["4", "1", "2", "soon", "6"],
        "lang": ["en", "en", "en", "en", "fr"],
    }), path)
    publishes_only_the_good(harness, path, bad={2: "no id", 3: "no title", 4: "v is not an integer: 'soon'"},
                            good=[sent(f"{p}-1", 4, "Actin\n\nForms filaments.", "en"),
                                  sent(f"{p}-5", 6, "Myosin\n\nWalks on actin.", "fr")])


def test_a_clean_gzipped_csv_exits_0_and_the_worker_stores_its_versions_and_metadata(harness, worker, tmp_path):
    """With no bad record the command exits 0 and names no line; each row is stored at its own version."""
    p = uid("clean")
    path = tmp_path / "documents.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        handle.write("id,title,body,v,lang\n")
        for n in range(20):
            lang = "en" if n % 2 else "fr"
            handle.write(f"{p}-{n},Abstract {n},\"Cells divide, proteins fold ({n}).\",{100 + n},{lang}\n")
    status, output, named = publish(harness, path, *FIELDS)
    assert status == 0 and named == {} and summary(output) == (harness.settings.topic_document_changes, 20, 0), output
    ids = [f"{p}-{n}" for n in range(20)]
    wait_for(lambda: harness.scalar("SELECT count(*) FROM documents WHERE doc_id = ANY(%s)", (ids,)) == 20,
             what="the 20 rows stored by the worker")
    assert harness.sql("SELECT doc_id, body, version, metadata FROM documents WHERE doc_id = ANY(%s) ORDER BY version",
                       (ids,)) == [(f"{p}-{n}", f"Abstract {n}\n\nCells divide, proteins fold ({n}).", 100 + n,
                                    {"lang": "en" if n % 2 else "fr"}) for n in range(20)]


def test_a_csv_saved_with_a_byte_order_mark_reads_its_first_column(harness, tmp_path):
    """Spreadsheets save "UTF-8 CSV" with a BOM before the header; the first column is still ``id``."""
    p = uid("csv-bom")
    path = tmp_path / "documents.csv"
    path.write_bytes(b"\xef\xbb\xbfid,title,body,v,lang\n"
                     + f"{p}-1,Lipids,Form membranes.,3,en\n,No id,here,1,en\n".encode())
    publishes_only_the_good(harness, path, bad={3: "no id"}, good=[sent(f"{p}-1", 3, "Lipids\n\nForm membranes.", "en")])


def test_values_json_cannot_carry_are_named_by_line_and_the_lines_after_them_are_sent(harness, tmp_path):
    """An integer beyond 64 bits, a lone surrogate in the id or the text, an infinite number and NaN in metadata,
    an integer of 5,000 digits and nesting Python's parser refuses: each line is named with its reason (none
    stops the command, none is sent as something else, e.g. NaN as null) and the good lines around them are sent."""
    p = uid("jsonl-values")
    good = {"title": "T", "body": "B", "v": 1}
    path = tmp_path / "documents.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": f"{p}-1", **good, "lang": "en"}),  # 1
        json.dumps({"id": f"{p}-2", **good, "lang": 2**64}),  # 2
        json.dumps({"id": "\ud800", **good}),  # 3: escaped, as json.dumps writes it
        json.dumps({"id": f"{p}-4", **good, "title": "caf\udfff"}),  # 4
        json.dumps({"id": f"{p}-5", **good, "lang": float("inf")}),  # 5: Infinity
        json.dumps({"id": f"{p}-6", **good, "lang": [1.0, float("nan")]}),  # 6: NaN
        f'{{"id": "{p}-7", "v": 1, "lang": {"1" * 5000}}}',  # 7
        "[" * 5000,  # 8
        json.dumps({"id": f"{p}-9", **good, "lang": 2**63}),  # 9: fits 64 bits unsigned
    ]) + "\n", encoding="utf-8")
    topic = uid("publish-test")
    status, output, named = publish(harness, path, *FIELDS, topic=topic)
    assert status == 1 and summary(output) == (topic, 2, 7), output
    assert named == {
        2: "cannot be sent as JSON: Integer exceeds 64-bit range",
        3: "id is not text: surrogates not allowed",
        4: "cannot be sent as JSON: str is not valid UTF-8: surrogates not allowed",
        5: "metadata lang is not a number JSON can carry (NaN or infinite)",
        6: "metadata lang/1 is not a number JSON can carry (NaN or infinite)",
        7: "not JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; "
           "use sys.set_int_max_str_digits() to increase the limit",
        8: "not JSON: maximum recursion depth exceeded while decoding a JSON array from a unicode string",
    }, output
    assert records_on(harness, topic) == {f"{p}-1": sent(f"{p}-1", 1, "T\n\nB", "en"),
                                          f"{p}-9": sent(f"{p}-9", 1, "T\n\nB", 2**63)}


def test_parquet_decimal_and_bytes_values_are_named_by_row(harness, tmp_path):
    """Parquet holds values JSON has no type for: a row whose metadata is a Decimal or bytes is named, not sent;
    the rows around it are."""
    p = uid("parquet-values")
    path = tmp_path / "documents.parquet"
    parquet.write_table(pyarrow.table({
        "id": [f"{p}-1", f"{p}-2", f"{p}-3", f"{p}-4"],
        "title": ["A", "B", "C", "D"], "body": ["a", "b", "c", "d"], "v": [1, 2, 3, 4],
        "price": pyarrow.array([None, Decimal("1.50"), None, None], pyarrow.decimal128(5, 2)),
        "blob": pyarrow.array([None, None, b"\x00\xff", None], pyarrow.binary()),
    }), path)
    topic = uid("publish-test")
    status, output, named = publish(harness, path, "--id-field", "id", "--text-field", "title", "--text-field", "body",
                                    "--version-field", "v", "--metadata-field", "price", "--metadata-field", "blob",
                                    topic=topic)
    assert status == 1 and summary(output) == (topic, 2, 2), output
    assert named == {2: "cannot be sent as JSON: Type is not JSON serializable: decimal.Decimal",
                     3: "cannot be sent as JSON: Type is not JSON serializable: bytes"}, output
    assert sorted(records_on(harness, topic)) == [f"{p}-1", f"{p}-4"]


def test_a_broker_that_cannot_be_reached_is_one_line_not_a_traceback(harness, tmp_path):
    """SEGUE_KAFKA_URL names a port nothing listens on: the command says so in its last line and exits 1."""
    path = tmp_path / "documents.jsonl"
    path.write_text(json.dumps({"id": "d", "title": "T", "body": "B", "v": 1}) + "\n", encoding="utf-8")
    port = free_port()
    unreachable = {**harness.env, "SEGUE_KAFKA_URL": f"kafka://127.0.0.1:{port}"}
    done = harness.segue("publish", str(path), *FIELDS, env=unreachable, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"Error: cannot reach the Kafka broker at 127.0.0.1:{port} ")
