"""Labelled query sets in the formats people already have: BEIR folders and TREC topics with qrels.

A :class:`LabelledSet` maps query ids to texts and to judged documents (relevance > 0 is
relevant), with an optional metadata dict per query (BEIR ``metadata``) to slice results
by, and a fingerprint over all of it so a verdict names exactly what it was measured on.
Document ids in the judgments are the corpus' own; ``doc_id_prefix`` maps them to
Segue's ``doc_id`` (the demo stores SciFact abstract 123 as ``scifact-123``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import ir_measures


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
    """A BEIR folder: ``queries.jsonl`` and ``qrels/<split>.tsv`` (or one ``qrels.tsv``)."""
    folder = Path(folder)
    qrels_file = folder / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        qrels_file = folder / "qrels.tsv"
    if not qrels_file.is_file():
        raise FileNotFoundError(f"{folder}: neither qrels/{split}.tsv nor qrels.tsv")
    queries, metadata = {}, {}
    for line in (folder / "queries.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            queries[str(record["_id"])] = record["text"]
            if record.get("metadata"):
                metadata[str(record["_id"])] = record["metadata"]
    qrels: dict[str, dict[str, int]] = {}
    with qrels_file.open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[doc_id_prefix + row["corpus-id"]] = int(row["score"])
    return LabelledSet(f"beir:{folder.name}/{split}", queries, qrels, metadata)


_TREC_TOPIC = re.compile(r"<num>\s*(?:Number:)?\s*(\S+).*?<title>\s*(?:Topic:)?\s*(.*?)\s*(?=<desc>|<narr>|</top>)",
                         re.DOTALL | re.IGNORECASE)


def read_trec(topics: Path, qrels: Path, *, doc_id_prefix: str = "") -> LabelledSet:
    """TREC topics (the ``<top>`` format, or ``id<TAB>text`` lines) and a TREC qrels file."""
    text = Path(topics).read_text()
    if "<top>" in text.lower():
        queries = {num: " ".join(title.split()) for num, title in _TREC_TOPIC.findall(text)}
    else:
        queries = dict(line.split("\t", 1) for line in text.splitlines() if line.strip())
    judged: dict[str, dict[str, int]] = {}
    for qrel in ir_measures.read_trec_qrels(str(qrels)):
        judged.setdefault(qrel.query_id, {})[doc_id_prefix + qrel.doc_id] = int(qrel.relevance)
    return LabelledSet(f"trec:{Path(topics).name}", {q: t.strip() for q, t in queries.items()}, judged)


def bundled_scifact() -> LabelledSet:
    """The bundled SciFact test set, with document ids as Segue's demo stores them (``scifact-<id>``)."""
    with resources.as_file(resources.files("segue").joinpath("data/scifact")) as folder:
        labelled = read_beir(folder, doc_id_prefix="scifact-")
    return LabelledSet("beir:scifact/test", labelled.queries, labelled.qrels, labelled.query_metadata)
