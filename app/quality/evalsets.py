"""Labelled query sets in the formats people already have: BEIR folders and TREC topics with qrels.

A :class:`LabelledSet` maps query ids to texts and to judged documents (relevance > 0 is
relevant), with an optional metadata dict per query (BEIR ``metadata``) to slice results
by, and a fingerprint over all of it so a verdict names exactly what it was measured on.
Document ids in the judgments are the corpus' own; ``doc_id_prefix`` maps them to
Segue's ``doc_id`` (the demo stores SciFact abstract 123 as ``scifact-123``).

A file is read exactly or refused: :class:`LabelledSetError` names the file, the first bad
line and what is wrong with it. A file is decoded first (its first line with bytes that are
not UTF-8 is named), then parsed (its first malformed line is named: JSON that is not, a
missing id or text, a duplicate query, a qrels line without its columns or with a score that
is no integer, a NUL character or a lone surrogate, which no database column can hold).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BEIR_QRELS_HEADER = ["query-id", "corpus-id", "score"]
_INTEGER = re.compile(r"[+-]?[0-9]+")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as ``surrogateescape`` reads it
_LF = re.compile("\n")  # where JSON Lines end
_NEWLINES = re.compile("\r\n|\r|\n")  # where csv and TREC lines end
_BLANK = " \t\r\n"
_TREC_TOP = re.compile(r"<top>", re.IGNORECASE)
_TREC_BLOCK = re.compile(r"<top>(.*?)</top>", re.DOTALL | re.IGNORECASE)
_TREC_NUM = re.compile(r"<num>(?>\s*(?:Number:)?\s*)([^\s<]+)", re.IGNORECASE)  # "Number:" is no number
_TREC_TITLE = re.compile(r"<title>\s*(?:Topic:)?(.*?)(?=<desc>|<narr>|\Z)", re.DOTALL | re.IGNORECASE)


class LabelledSetError(ValueError):
    """A labelled-set file that cannot be read as it stands: the file, the line and what is wrong."""


@dataclass(frozen=True)
class LabelledSet:
    """Queries, their judged documents (doc id → relevance) and optional per-query metadata."""

    name: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    query_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 over the queries, judgments and metadata, in a canonical order."""
        canonical = json.dumps([sorted(self.queries.items()), sorted((q, sorted(j.items())) for q, j in self.qrels.items()),
                                sorted(self.query_metadata.items())], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def judged(self) -> list[str]:
        """Ids of the queries with a text and at least one relevant document, sorted."""
        return sorted(q for q, judged in self.qrels.items() if q in self.queries and any(r > 0 for r in judged.values()))

    def subset(self, query_ids: list[str]) -> LabelledSet:
        """The same set restricted to ``query_ids``."""
        keep = set(query_ids)
        return LabelledSet(self.name, {q: t for q, t in self.queries.items() if q in keep},
                           {q: j for q, j in self.qrels.items() if q in keep},
                           {q: m for q, m in self.query_metadata.items() if q in keep})


def read_beir(folder: Path, *, split: str = "test", doc_id_prefix: str = "") -> LabelledSet:
    """A BEIR folder: ``queries.jsonl`` and ``qrels/<split>.tsv`` (or one ``qrels.tsv``) with its header row."""
    folder = Path(folder)
    qrels_file = folder / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        qrels_file = folder / "qrels.tsv"
    if not qrels_file.is_file():
        raise LabelledSetError(f"{folder}: neither qrels/{split}.tsv nor qrels.tsv")
    queries, metadata = _beir_queries(folder / "queries.jsonl")
    return LabelledSet(f"beir:{folder.name}/{split}", queries, _beir_qrels(qrels_file, doc_id_prefix), metadata)


def read_trec(topics: Path, qrels: Path, *, doc_id_prefix: str = "") -> LabelledSet:
    """TREC topics (the ``<top>`` format, or ``id<TAB>text`` lines) and a TREC qrels file (``qid iter docid rel``)."""
    topics, qrels = Path(topics), Path(qrels)
    text = _NEWLINES.sub("\n", _read(topics, _NEWLINES))
    queries = _trec_blocks(topics, text) if _TREC_TOP.search(text) else _trec_lines(topics, text)
    return LabelledSet(f"trec:{topics.name}", queries, _trec_qrels(qrels, doc_id_prefix))


def _read(path: Path, newlines: re.Pattern) -> str:
    """The text of a UTF-8 file (gzipped when named ``.gz``), a byte order mark dropped, its line endings kept.

    A file that cannot be read is refused, and one with bytes that are not UTF-8 at the first
    line holding one (lines end at ``newlines``).
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            text = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise LabelledSetError(f"{path}: cannot be read: {error}") from None
    undecodable = _UNDECODABLE.search(text)
    if undecodable is not None:
        line = len(newlines.findall(text, 0, undecodable.start())) + 1
        raise LabelledSetError(f"{path}, line {line}: bytes that are not UTF-8")
    return text


def _unstorable(value: Any) -> str | None:
    """What makes a string in ``value`` (keys included, at any depth) unfit for a database, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            if "\x00" in item:
                return "a NUL character"
            lone = next((c for c in item if "\ud800" <= c <= "\udfff"), None)
            if lone is not None:
                return f"a lone surrogate (U+{ord(lone):04X}), which is not text"
    return None


def _identifier(path: Path, number: int, what: str, value: Any) -> str:
    """``value`` as an id (a non-empty string or an integer), else refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise LabelledSetError(f"{path}, line {number}: {what} is not a non-empty string: {value!r:.80}")
    if (bad := _unstorable(value)) is not None:
        raise LabelledSetError(f"{path}, line {number}: {what} holds {bad}")
    return value


def _score(path: Path, number: int, value: str) -> int:
    if not _INTEGER.fullmatch(value):
        raise LabelledSetError(f"{path}, line {number}: the score is not an integer: {value!r:.80}")
    return int(value)


def _judge(path: Path, judged: dict[str, dict[str, int]], seen: dict[tuple[str, str], int], number: int,
           query_id: str, doc_id: str, score: int) -> None:
    """Record a judgment; the same document judged again with another score is refused."""
    earlier = judged.setdefault(query_id, {}).get(doc_id)
    if earlier is not None and earlier != score:
        raise LabelledSetError(f"{path}, line {number}: query {query_id!r:.80} judges {doc_id!r:.80} {score}, "
                               f"line {seen[query_id, doc_id]} judged it {earlier}")
    judged[query_id][doc_id] = score
    seen.setdefault((query_id, doc_id), number)


def _beir_queries(path: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """``queries.jsonl``: a JSON object per line with its ``_id``, ``text`` and optional ``metadata``."""
    queries: dict[str, str] = {}
    metadata: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(_read(path, _LF).split("\n"), start=1):
        if not line.strip(_BLANK):
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # a column of this line in a JSON error
        except json.JSONDecodeError as error:
            raise LabelledSetError(f"{path}, line {number}: not JSON: {error.msg} at column {error.colno}") from None
        except (ValueError, RecursionError) as error:  # an integer of over 4,300 digits, nesting too deep
            raise LabelledSetError(f"{path}, line {number}: not JSON: {error}") from None
        if not isinstance(record, dict):
            raise LabelledSetError(f"{path}, line {number}: not a JSON object but {type(record).__name__}")
        for name in ("_id", "text"):
            if name not in record:
                raise LabelledSetError(f"{path}, line {number}: no {name}")
        query_id = _identifier(path, number, "_id", record["_id"])
        if query_id in first_line:
            raise LabelledSetError(f"{path}, line {number}: query {query_id!r:.80} again (first on line "
                                   f"{first_line[query_id]})")
        text, extra = record["text"], record.get("metadata")
        if not isinstance(text, str) or not text.strip():
            raise LabelledSetError(f"{path}, line {number}: the text is not a non-empty string: {text!r:.80}")
        if extra is not None and not isinstance(extra, dict):
            raise LabelledSetError(f"{path}, line {number}: metadata is not a JSON object but {type(extra).__name__}")
        if (bad := _unstorable([text, extra])) is not None:
            raise LabelledSetError(f"{path}, line {number}: holds {bad}")
        first_line[query_id] = number
        queries[query_id] = text
        if extra:
            metadata[query_id] = extra
    return queries, metadata


def _beir_qrels(path: Path, doc_id_prefix: str) -> dict[str, dict[str, int]]:
    """``query-id<TAB>corpus-id<TAB>score`` rows after that header, read as BEIR reads them (csv, tab-separated)."""
    judged: dict[str, dict[str, int]] = {}
    seen: dict[tuple[str, str], int] = {}
    header_seen = False
    for number, row in _tab_separated(path):
        if not "".join(row).strip(_BLANK):
            continue
        if not header_seen:
            if row != BEIR_QRELS_HEADER:
                raise LabelledSetError(f"{path}, line {number}: not the header {'<TAB>'.join(BEIR_QRELS_HEADER)}")
            header_seen = True
            continue
        if len(row) != 3:
            raise LabelledSetError(f"{path}, line {number}: {len(row)} column(s), not query-id, corpus-id and score")
        query_id = _identifier(path, number, "the query-id", row[0])
        doc_id = _identifier(path, number, "the corpus-id", row[1])
        _judge(path, judged, seen, number, query_id, doc_id_prefix + doc_id, _score(path, number, row[2]))
    return judged


def _tab_separated(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(the line it starts on, row) of a tab-separated file, read with csv as BEIR does; what csv refuses is refused."""
    rows = csv.reader(io.StringIO(_read(path, _NEWLINES), newline=""), delimiter="\t")
    starts_on = 1
    try:
        for row in rows:
            yield starts_on, row
            starts_on = rows.line_num + 1
    except csv.Error as error:
        raise LabelledSetError(f"{path}, line {starts_on}: {error}") from None


def _trec_lines(path: Path, text: str) -> dict[str, str]:
    """``id<TAB>text`` lines."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        query_id, tab, query = line.partition("\t")
        if not tab:
            raise LabelledSetError(f"{path}, line {number}: neither id<TAB>text nor a <top> topic")
        _add_topic(path, number, queries, first_line, query_id.strip(), query.strip())
    return queries


def _trec_blocks(path: Path, text: str) -> dict[str, str]:
    """``<top>`` topics: each one's ``<num>`` and ``<title>`` (its whitespace collapsed)."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    end = 0
    for block in _TREC_BLOCK.finditer(text):
        number = text.count("\n", 0, block.start()) + 1
        end = block.end()
        inner = block[1]
        if _TREC_TOP.search(inner):
            raise LabelledSetError(f"{path}, line {number}: a <top> without its </top>")
        num, title = _TREC_NUM.search(inner), _TREC_TITLE.search(inner)
        if num is None or title is None:
            missing = "<num>" if num is None else "<title>"
            raise LabelledSetError(f"{path}, line {number}: a topic without its {missing}")
        _add_topic(path, number, queries, first_line, num[1], " ".join(title[1].split()))
    unclosed = _TREC_TOP.search(text, end)
    if unclosed is not None:
        line = text.count("\n", 0, unclosed.start()) + 1
        raise LabelledSetError(f"{path}, line {line}: a <top> without its </top>")
    return queries


def _add_topic(path: Path, number: int, queries: dict[str, str], first_line: dict[str, int], query_id: str,
               query: str) -> None:
    query_id = _identifier(path, number, "the topic id", query_id)
    if any(c.isspace() for c in query_id):
        raise LabelledSetError(f"{path}, line {number}: the topic id {query_id!r:.80} holds whitespace, "
                               "which a qrels line cannot")
    if query_id in first_line:
        raise LabelledSetError(f"{path}, line {number}: topic {query_id!r:.80} again (first on line "
                               f"{first_line[query_id]})")
    if not query:
        raise LabelledSetError(f"{path}, line {number}: topic {query_id!r:.80} has an empty title")
    if (bad := _unstorable(query)) is not None:
        raise LabelledSetError(f"{path}, line {number}: the title holds {bad}")
    first_line[query_id] = number
    queries[query_id] = query


def _trec_qrels(path: Path, doc_id_prefix: str) -> dict[str, dict[str, int]]:
    """``query-id iteration doc-id relevance`` lines, separated by whitespace, as trec_eval reads them."""
    judged: dict[str, dict[str, int]] = {}
    seen: dict[tuple[str, str], int] = {}
    for number, line in enumerate(_NEWLINES.split(_read(path, _NEWLINES)), start=1):
        columns = line.split()
        if not columns:
            continue
        if len(columns) != 4:
            raise LabelledSetError(f"{path}, line {number}: {len(columns)} column(s), not query-id, iteration, "
                                   "doc-id and relevance")
        query_id = _identifier(path, number, "the query-id", columns[0])
        doc_id = _identifier(path, number, "the doc-id", columns[2])
        _judge(path, judged, seen, number, query_id, doc_id_prefix + doc_id, _score(path, number, columns[3]))
    return judged
