"""Properties of reading labelled sets, BEIR folders and TREC topics with qrels, for any file (Hypothesis).

A file is either read exactly (the queries, their metadata and the judgments it holds) or
refused with :class:`LabelledSetError` naming the file and its first bad line: a file is
decoded first, so the first line with bytes that are not UTF-8, else its first malformed line
(JSON that is not, a missing or empty id or text, a duplicate query, a qrels line without its
columns or with a score that is no integer, a NUL character or a lone surrogate). Never
another exception. BEIR's quirks read as BEIR reads them: the qrels header row, ``metadata``,
a byte order mark, blank lines, CRLF. Pure functions: no services.
"""

from __future__ import annotations

import csv
import io
import json
import re
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segue.devtools.corpus import bundled_scifact
from segue.quality.evalsets import (
    BEIR_QRELS_HEADER,
    LabelledSetError,
    read_beir,
    read_trec,
)

PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PREFIX = "corpus-"
NEWLINES = re.compile(r"\r\n|\r|\n")

# -- strategies ---------------------------------------------------------------------------------
plain = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=6)
ids = plain | st.sampled_from(["q1", "q2", "7"])


TEXT = st.characters(codec="utf-8")  # any character but a lone surrogate


def hostile(fragments: list[str], alphabet: st.SearchStrategy = TEXT) -> st.SearchStrategy[str]:
    """Short strings mixing characters of ``alphabet`` (any but lone surrogates) with ``fragments`` (NUL, lone
    surrogates, BOM, Unicode line breaks…)."""
    return st.lists(st.text(alphabet, max_size=3) | st.sampled_from(fragments), max_size=4).map("".join)


# "\udcff" is written as the byte 0xFF; other lone surrogates as JSON escapes (or, raw, as bytes that are not UTF-8).
json_strings = hostile(["\x00", "\ud800", "\udcff", "\ufeff", "é", "\u2028", "\x85", "\r", "\n", "\t", " ", '"', "😀"])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | json_strings,
                           lambda inner: st.lists(inner, max_size=2) | st.dictionaries(json_strings, inner, max_size=2),
                           max_leaves=4)
good_queries = st.fixed_dictionaries({"_id": ids, "text": plain},
                                     optional={"metadata": st.dictionaries(plain, plain | st.integers(), max_size=2)})
any_queries = st.fixed_dictionaries({}, optional={
    "_id": ids | st.integers() | json_strings | st.sampled_from(["", None, True, 1.5]),
    "text": plain | json_strings | st.sampled_from(["", "  ", None, 7]),
    "metadata": json_values, "title": plain})
GARBAGE = [b"{", b"nope", b"\xff", b"\x00", b"[" * 5000, b"1" * 5000, b'{"_id": "a", "text": "t"} {"_id": "b"}',
           b'{"_id": "a", "text": "t"}\r{"_id": "b", "text": "u"}', b'{"_id": "x", "text": "caf\xe9"}']
query_lines = st.one_of(
    st.tuples(st.just("json"), good_queries | any_queries | json_values, st.booleans()),  # (kind, value, escaped)
    st.tuples(st.just("garbage"), st.sampled_from(GARBAGE), st.just(True)),
    st.tuples(st.just("blank"), st.sampled_from(["", " ", "\t"]), st.just(True)),
)
tsv_cells = ids | st.just("") | hostile(["\x00", "\udcff", '"', "\t", " ", "é", "\u2028", "\r", "\n", "\ufeff"])
scores = st.integers(-2, 3).map(str) | st.sampled_from(["1.0", "x", "", " 1", "+2", "١", "99999999999999999999"])
qrels_rows = st.one_of(
    st.tuples(st.just("row"), st.tuples(ids, ids, st.integers(-1, 2).map(str)).map(list)),
    st.tuples(st.just("row"), st.tuples(tsv_cells, tsv_cells, scores).map(list)),
    st.tuples(st.just("row"), st.lists(tsv_cells, min_size=1, max_size=4)),
    st.tuples(st.just("blank"), st.just([])),
)
layouts = st.fixed_dictionaries({"crlf": st.booleans(), "bom": st.booleans(), "final_newline": st.booleans()})
# TREC: topic ids and titles without "<" (a title ends at the next tag) nor line breaks of their own.
trec_text = hostile(["\x00", "\udcff", "\ufeff", "é", "\u2028", "\x85", "\x0c", "\t", " ", "😀"],
                    st.characters(codec="utf-8", exclude_characters="<\r\n"))
topic_lines = st.one_of(
    st.tuples(st.just("topic"), ids, plain),
    st.tuples(st.just("topic"), trec_text, trec_text),
    st.tuples(st.just("line"), trec_text, st.just("")),  # a line of its own: blank, or neither id<TAB>text
)
blocks = st.fixed_dictionaries({
    "num": ids | hostile(["\x00", "\udcff", "é"], st.characters(categories=("L", "N"))),
    "title": st.lists(plain | trec_text, min_size=1, max_size=2), "number_prefix": st.booleans(),
    "desc": trec_text, "missing": st.sampled_from([None, None, None, "<num>", "<title>", "</top>"])})
trec_qrels_lines = st.one_of(
    st.tuples(st.just("qrel"), st.tuples(ids, st.just("0"), ids, st.integers(-1, 2).map(str)).map(list)),
    st.tuples(st.just("qrel"), st.tuples(trec_text, st.just("Q0"), trec_text, scores).map(list)),
    st.tuples(st.just("line"), trec_text.map(lambda text: [text])),
)


# -- files and the oracle -----------------------------------------------------------------------------
class Refused(Exception):
    """What the oracle expects instead of a labelled set: the file refused at this line."""

    def __init__(self, line: int, path: Path | None = None):
        super().__init__(line, path)
        self.line, self.path = line, path


def refused_in(path: Path, oracle, *args):
    """``oracle(*args)``, its refusal naming ``path``."""
    try:
        return oracle(*args)
    except Refused as refused:
        raise Refused(refused.line, path) from None


def check(read, expected) -> None:
    """``read()`` gives the queries, judgments and metadata ``expected()`` says, or is refused where it says, with
    :class:`LabelledSetError` naming the file and the line."""
    try:
        said = expected()
    except Refused as refused:
        with pytest.raises(LabelledSetError) as error:
            read()
        assert str(error.value).startswith(f"{refused.path}, line {refused.line}: "), (str(error.value), refused.line)
        return
    labelled = read()
    assert canonical([labelled.queries, labelled.qrels, labelled.query_metadata]) == canonical(said)


def canonical(value: Any) -> str:
    """As JSON text: NaN equals NaN, 1 differs from 1.0."""
    return json.dumps(value, sort_keys=True)


def joined(lines: list, layout: dict) -> Any:
    """``lines`` ended by LF or CRLF (the last one too, when the layout says so), str or bytes alike."""
    end = "\r\n" if layout["crlf"] else "\n"
    if any(isinstance(line, bytes) for line in lines):
        end = end.encode()
    return end.join(lines) + (end if layout["final_newline"] else end[:0])


def written(path: Path, text: str | bytes, layout: dict) -> str:
    """``text`` in ``path`` as UTF-8 ("\\udcff" as the byte 0xFF), after a byte order mark when the layout says so;
    the text a reader sees (it takes a leading U+FEFF for a byte order mark either way)."""
    data = (b"\xef\xbb\xbf" if layout["bom"] else b"") + (
        text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))
    path.write_bytes(data)
    return data.decode("utf-8-sig", "surrogateescape")


def first_undecodable(text: str, newlines: re.Pattern = NEWLINES) -> None:
    """A file is decoded first: a byte that is not UTF-8 (read as ``surrogateescape`` does) refuses its line."""
    found = re.search("[\udc80-\udcff]", text)
    if found:
        raise Refused(len(newlines.findall(text, 0, found.start())) + 1)


def storable(value: Any) -> bool:
    """No NUL character and no lone surrogate in any string of ``value`` (keys included)."""
    if isinstance(value, dict):
        return all(storable(key) and storable(inner) for key, inner in value.items())
    if isinstance(value, list):
        return all(map(storable, value))
    if isinstance(value, str):
        return "\x00" not in value and not re.search("[\ud800-\udfff]", value)
    return True


def identifier(value: Any, line: int) -> str:
    """An id: a non-empty string a database can hold, or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value or not storable(value):
        raise Refused(line)
    return value


def judge(judged: dict, line: int, query_id: str, doc_id: str, score: str) -> None:
    """A judgment: an integer score; the same document judged again only with the same score."""
    if not re.fullmatch(r"[+-]?[0-9]+", score):
        raise Refused(line)
    earlier = judged.setdefault(query_id, {}).get(PREFIX + doc_id)
    if earlier is not None and earlier != int(score):
        raise Refused(line)
    judged[query_id][PREFIX + doc_id] = int(score)


# -- BEIR ---------------------------------------------------------------------------------------------
def beir_queries_said(text: str) -> tuple[dict, dict]:
    """The queries and metadata of a queries.jsonl's text (read as ``surrogateescape``, without its BOM)."""
    first_undecodable(text, re.compile("\n"))  # JSON Lines end at LF alone
    queries, metadata = {}, {}
    for line, record_text in enumerate(text.split("\n"), start=1):
        if not record_text.strip(" \t\r"):
            continue
        try:
            record = json.loads(record_text)
        except (ValueError, RecursionError):
            raise Refused(line) from None
        if not isinstance(record, dict) or "_id" not in record or "text" not in record:
            raise Refused(line)
        query_id = identifier(record["_id"], line)
        query, extra = record["text"], record.get("metadata")
        if query_id in queries or not isinstance(query, str) or not query.strip() or not storable(query):
            raise Refused(line)
        if extra is not None and (not isinstance(extra, dict) or not storable(extra)):
            raise Refused(line)
        queries[query_id] = query
        if extra:
            metadata[query_id] = extra
    return queries, metadata


def beir_qrels_said(rows: list[tuple[int, list[str]]], text: str) -> dict:
    """The judgments of a qrels file's ``rows`` (each with the line it starts on), its ``text`` decoded first."""
    first_undecodable(text)
    judged: dict = {}
    header_seen = False
    for line, cells in rows:
        if not "".join(cells).strip(" \t\r\n"):
            continue
        if not header_seen:
            if cells != BEIR_QRELS_HEADER:
                raise Refused(line)
            header_seen = True
            continue
        if len(cells) != 3:
            raise Refused(line)
        judge(judged, line, identifier(cells[0], line), identifier(cells[1], line), cells[2])
    return judged


def beir_folder(folder: Path, lines: list, header: bool, rows: list, layout: dict) -> tuple[str, list, str]:
    """A BEIR folder of these queries.jsonl lines and qrels rows; the queries' text as read, the qrels rows by the
    line they start on and the qrels text."""
    encoded = [json.dumps(value, ensure_ascii=escaped).encode("utf-8", "surrogatepass") if kind == "json"
               else value if isinstance(value, bytes) else value.encode() for kind, value, escaped in lines]
    queries_text = written(folder / "queries.jsonl", joined(encoded, layout), layout)
    ending = "\r\n" if layout["crlf"] else "\n"
    buffer = io.StringIO(newline="")
    # Ending lines in LF, Python's writer leaves a field with a lone CR unquoted: a file that says something else.
    writer = csv.writer(buffer, delimiter="\t", lineterminator=ending,
                        quoting=csv.QUOTE_MINIMAL if layout["crlf"] else csv.QUOTE_ALL)
    numbered = []
    for kind, cells in ([("row", BEIR_QRELS_HEADER)] if header else []) + rows:
        line = len(NEWLINES.findall(buffer.getvalue())) + 1
        if kind == "blank":
            buffer.write(ending)
            continue
        writer.writerow(cells)
        numbered.append((line, cells))
    text = buffer.getvalue() if layout["final_newline"] else buffer.getvalue().removesuffix(ending)
    (folder / "qrels").mkdir()
    if written(folder / "qrels" / "test.tsv", text, layout) != text:  # a first cell beginning with U+FEFF
        numbered[0][1][0] = numbered[0][1][0].removeprefix("\ufeff")
    return queries_text, numbered, text


@PROPERTY
@given(lines=st.lists(query_lines, max_size=8), header=st.booleans(), rows=st.lists(qrels_rows, max_size=8),
       layout=layouts)
def test_a_beir_folder_is_read_exactly_or_refused_at_its_first_bad_line(lines, header, rows, layout):
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        queries_text, numbered, qrels_text = beir_folder(folder, lines, header, rows, layout)

        def expected():
            queries, metadata = refused_in(folder / "queries.jsonl", beir_queries_said, queries_text)
            return [queries, refused_in(folder / "qrels" / "test.tsv", beir_qrels_said, numbered, qrels_text), metadata]

        check(lambda: read_beir(folder, doc_id_prefix=PREFIX), expected)


def test_the_bundled_scifact_set_reads_as_beir_ships_it():
    """300 queries and 339 judgments, every query judged; the header row is not a judgment."""
    labelled = bundled_scifact()
    assert len(labelled.queries) == 300 and sum(map(len, labelled.qrels.values())) == 339
    assert len(labelled.judged()) == 300 and "query-id" not in labelled.qrels


# -- TREC ---------------------------------------------------------------------------------------------
def topic(queries: dict, line: int, query_id: str, query: str) -> None:
    """A topic: an id without whitespace (a qrels line could not name it), not seen before, a non-empty title."""
    query_id = identifier(query_id, line)
    if any(c.isspace() for c in query_id) or query_id in queries or not query or not storable(query):
        raise Refused(line)
    queries[query_id] = query


def topic_lines_said(text: str) -> dict:
    """The queries of ``id<TAB>text`` lines (lines end at CR, LF or CRLF)."""
    first_undecodable(text)
    queries: dict = {}
    for line, content in enumerate(NEWLINES.split(text), start=1):
        if not content.strip():
            continue
        query_id, tab, query = content.partition("\t")
        if not tab:
            raise Refused(line)
        topic(queries, line, query_id.strip(), query.strip())
    return queries


def trec_qrels_said(text: str) -> dict:
    """The judgments of ``query-id iteration doc-id relevance`` lines."""
    first_undecodable(text)
    judged: dict = {}
    for line, content in enumerate(NEWLINES.split(text), start=1):
        columns = content.split()
        if not columns:
            continue
        if len(columns) != 4:
            raise Refused(line)
        judge(judged, line, identifier(columns[0], line), identifier(columns[2], line), columns[3])
    return judged


@PROPERTY
@given(lines=st.lists(topic_lines, max_size=8), qrels=st.lists(trec_qrels_lines, max_size=8), layout=layouts)
def test_trec_lines_and_qrels_are_read_exactly_or_refused_at_their_first_bad_line(lines, qrels, layout):
    with tempfile.TemporaryDirectory() as name:
        topics_path, qrels_path = Path(name) / "topics.txt", Path(name) / "qrels.txt"
        topics_text = joined([f"{first}\t{second}" if kind == "topic" else first for kind, first, second in lines],
                             layout)
        qrels_text = joined([" ".join(cells) for _, cells in qrels], layout)
        topics_text, qrels_text = written(topics_path, topics_text, layout), written(qrels_path, qrels_text, layout)

        def expected():
            return [refused_in(topics_path, topic_lines_said, topics_text),
                    refused_in(qrels_path, trec_qrels_said, qrels_text), {}]

        check(lambda: read_trec(topics_path, qrels_path, doc_id_prefix=PREFIX), expected)


def blocks_file(topics: list[dict]) -> tuple[str, list[int]]:
    """``<top>`` topics as TREC writes them, some without their ``<num>``, ``<title>`` or (the last) ``</top>``;
    and the line each topic starts on."""
    parts, starts = [], []
    for n, block in enumerate(topics):
        starts.append(sum(part.count("\n") + 1 for part in parts) + 1)
        missing = block["missing"] if block["missing"] != "</top>" or n == len(topics) - 1 else None
        lines = ["<top>", f"<num> {'Number: ' if block['number_prefix'] else ''}{block['num']}",
                 "<title> " + "\n".join(block["title"]), "<desc> Description:", block["desc"], "</top>", ""]
        parts.append("\n".join(line for line in lines if not (missing and line.startswith(missing))))
    return "".join(part + "\n" for part in parts), starts


def blocks_said(topics: list[dict], text: str, starts: list[int]) -> dict:
    """The queries of ``<top>`` topics: each one's number and title, its whitespace collapsed."""
    first_undecodable(text)
    queries: dict = {}
    for n, (block, start) in enumerate(zip(topics, starts)):
        if block["missing"] and (block["missing"] != "</top>" or n == len(topics) - 1):
            raise Refused(start)
        topic(queries, start, block["num"], " ".join(" ".join(block["title"]).split()))
    return queries


@PROPERTY
@given(topics=st.lists(blocks, min_size=1, max_size=5), layout=layouts)
def test_trec_top_topics_are_read_exactly_or_refused_at_the_first_bad_topic(topics, layout):
    with tempfile.TemporaryDirectory() as name:
        topics_path, qrels_path = Path(name) / "topics.txt", Path(name) / "qrels.txt"
        text, starts = blocks_file(topics)
        text = written(topics_path, text.replace("\n", "\r\n") if layout["crlf"] else text, layout)
        qrels_path.write_text("")

        def expected():
            return [refused_in(topics_path, blocks_said, topics, text, starts), {}, {}]

        check(lambda: read_trec(topics_path, qrels_path), expected)
