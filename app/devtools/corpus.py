"""The bundled SciFact corpus (BEIR test split; see data/scifact/ATTRIBUTION.md)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import psycopg

from segue.quality.evalsets import LabelledSet, read_beir
from segue.spec import ModelSpec
from segue.storage.documents import insert_embedded


@dataclass(frozen=True)
class CorpusDocument:
    doc_id: str
    text: str


def scifact_documents(limit: int | None = None) -> Iterator[CorpusDocument]:
    """SciFact abstracts in file order, title and abstract joined as the body."""
    path = resources.files("segue.devtools").joinpath("data/scifact/corpus.jsonl.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for count, line in enumerate(lines):
            if limit is not None and count >= limit:
                return
            record = json.loads(line)
            yield CorpusDocument(f"scifact-{record['_id']}", f"{record['title']}\n\n{record['text']}".strip())


def scifact_queries_list(limit: int) -> list[str]:
    """The first ``limit`` SciFact claims."""
    return list(bundled_scifact().queries.values())[:limit]


def store_embedded(conn: psycopg.Connection, documents: Sequence[CorpusDocument],
                   vectors: Mapping[ModelSpec, np.ndarray]) -> None:
    """Write ``documents`` at version 1 with a current vector for each model in ``vectors`` (row n for
    document n), in one transaction: a corpus embedded ahead of time, for benchmarks and tests."""
    insert_embedded(conn, [(d.doc_id, d.text) for d in documents],
                    {spec.version: matrix for spec, matrix in vectors.items()})


def bundled_scifact() -> LabelledSet:
    """The bundled SciFact test set, with document ids as Segue's demo stores them (``scifact-<id>``)."""
    with resources.as_file(resources.files("segue.devtools").joinpath("data/scifact")) as folder:
        labelled = read_beir(folder, doc_id_prefix="scifact-")
    return LabelledSet("beir:scifact/test", labelled.queries, labelled.qrels, labelled.query_metadata)
