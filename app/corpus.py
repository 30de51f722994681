"""The bundled SciFact corpus (BEIR test split; see data/scifact/ATTRIBUTION.md)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class CorpusDocument:
    doc_id: str
    text: str


def scifact_documents(limit: int | None = None) -> Iterator[CorpusDocument]:
    """SciFact abstracts in file order, title and abstract joined as the body."""
    path = resources.files("app").joinpath("data/scifact/corpus.jsonl.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for count, line in enumerate(lines):
            if limit is not None and count >= limit:
                return
            record = json.loads(line)
            yield CorpusDocument(f"scifact-{record['_id']}", f"{record['title']}\n\n{record['text']}".strip())
