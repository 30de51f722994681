"""The bundled SciFact corpus (BEIR test split; see data/scifact/ATTRIBUTION.md)."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class CorpusDocument:
    doc_id: str
    text: str


def scifact_documents(limit: int | None = None) -> Iterator[CorpusDocument]:
    """SciFact abstracts in file order, title and abstract joined as the body."""
    path = resources.files("segue").joinpath("data/scifact/corpus.jsonl.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for count, line in enumerate(lines):
            if limit is not None and count >= limit:
                return
            record = json.loads(line)
            yield CorpusDocument(f"scifact-{record['_id']}", f"{record['title']}\n\n{record['text']}".strip())


def scifact_queries() -> dict[str, str]:
    """SciFact test claims by query id."""
    path = resources.files("segue").joinpath("data/scifact/queries.jsonl")
    return {q["_id"]: q["text"] for q in map(json.loads, path.read_text().splitlines())}


def scifact_queries_list(limit: int) -> list[str]:
    """The first ``limit`` SciFact claims."""
    return list(scifact_queries().values())[:limit]


def scifact_qrels() -> dict[str, set[str]]:
    """Relevant document ids (as stored by Segue) per query id."""
    lines = resources.files("segue").joinpath("data/scifact/qrels.tsv").read_text().splitlines()[1:]
    relevant: dict[str, set[str]] = {}
    for line in lines:
        query_id, corpus_id, score = line.split("\t")
        if int(score) > 0:
            relevant.setdefault(query_id, set()).add(f"scifact-{corpus_id}")
    return relevant


def ndcg_at_10(rankings: dict[str, list[str]], relevant: dict[str, set[str]]) -> float:
    """Mean nDCG@10 with binary relevance over the queries in ``rankings``."""
    if not rankings:
        return 0.0
    total = 0.0
    for query_id, ranked in rankings.items():
        gains = relevant[query_id]
        dcg = sum(1 / math.log2(rank + 2) for rank, doc_id in enumerate(ranked[:10]) if doc_id in gains)
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(gains), 10)))
        total += dcg / ideal
    return total / len(rankings)
