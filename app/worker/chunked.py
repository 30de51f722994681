"""Embedding documents with a chunked model: split, reuse the vectors of unchanged chunks, embed the rest.

A document's chunks come from its model's policy and tokenizer
(:mod:`segue.embedding.chunking`). A chunk whose text the model has embedded before for
the same document (same hash in its chunk table) keeps that vector; chunks repeated
within the batch are embedded once. The document vector, written to the model's column
on ``documents``, is the normalised mean of its chunk vectors.

What comes back is an :class:`~segue.embedding.engine.Embedded` per document, so the
pipeline treats a chunked model as any other: its tokens are those sent to the model
now (reused chunks cost none), and a document is rejected when one of its chunks is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from segue import metrics
from segue.embedding import chunking
from segue.embedding.engine import Embedded, EmbeddingEngine
from segue.spec import ModelSpec
from segue.storage.chunks import ChunkRow

KnownVectors = Callable[[Sequence[tuple[str, bytes]]], Awaitable[dict[tuple[str, bytes], np.ndarray]]]


@dataclass(frozen=True)
class ChunkedEmbedded(Embedded):
    """Per document: its vector (the mean of its chunks'), its chunks, and the tokens sent to the model for it."""

    chunks: list[list[ChunkRow]] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # tokens given to the model for each document now
    embedded_chunks: list[int] = field(default_factory=list)  # chunks of each document embedded now (not reused)

    def detail(self, i: int) -> dict[str, int]:
        """What document ``i``'s changelog row records: its chunks, and how many of them were embedded now."""
        return {"chunks": len(self.chunks[i]), "chunks_embedded": self.embedded_chunks[i]}

    def tokens_used(self, spec: ModelSpec) -> list[int]:
        """The tokens given to the model for each document: its new chunks' (what an API bills)."""
        return list(self.sent)


async def embed_documents(engine: EmbeddingEngine, spec: ModelSpec, doc_ids: Sequence[str], texts: Sequence[str],
                          *, priority: int, known: KnownVectors) -> ChunkedEmbedded:
    """Embed documents ``doc_ids`` (bodies ``texts``) with chunked model ``spec``; ``known`` looks up the vectors
    of chunks it has already (by document and chunk hash)."""
    policy = chunking.policy_of(spec)
    split = [chunking.split(policy, text, spans)
             for text, spans in zip(texts, await engine.token_spans(spec, texts))]
    stored = await known([(doc_id, chunk.sha256) for doc_id, pieces in zip(doc_ids, split) for chunk in pieces])
    todo: dict[bytes, int] = {}  # chunk hash: its row in the texts sent
    sent_texts: list[str] = []
    for doc_id, pieces in zip(doc_ids, split):
        for chunk in pieces:
            if (doc_id, chunk.sha256) not in stored and chunk.sha256 not in todo:
                todo[chunk.sha256] = len(sent_texts)
                sent_texts.append(chunk.text)
    fresh = await engine.embed_counted(spec, sent_texts, priority=priority)
    fresh_used = fresh.tokens_used(spec)
    vectors = np.zeros((len(texts), spec.dim), dtype=np.float32)
    tokens, sent, rejected, rows, embedded = [], [], {}, [], []
    for i, (doc_id, pieces) in enumerate(zip(doc_ids, split)):
        document_rows: list[ChunkRow] = []
        used = truncated = fresh_chunks = 0
        counted: set[bytes] = set()
        for n, chunk in enumerate(pieces):
            if (doc_id, chunk.sha256) in stored:
                vector = stored[(doc_id, chunk.sha256)]
            else:
                row = todo[chunk.sha256]
                if row in fresh.rejected:
                    rejected[i] = f"{fresh.rejected[row]} (chunk {n}, characters {chunk.start}-{chunk.end})"
                vector = fresh.vectors[row]
                if chunk.sha256 not in counted:
                    counted.add(chunk.sha256)
                    used += fresh_used[row]
                    truncated += fresh.tokens[row] - fresh_used[row]
                fresh_chunks += 1
            document_rows.append(ChunkRow(n, chunk.start, chunk.end, chunk.tokens, chunk.sha256, vector))
        mean = np.mean([r.vector for r in document_rows], axis=0)
        norm = float(np.linalg.norm(mean))
        if i not in rejected:
            vectors[i] = mean / norm if norm > 0 else mean
        rows.append(document_rows)
        sent.append(used)
        tokens.append(used + truncated)
        embedded.append(fresh_chunks)
    metrics.CHUNKS.labels(spec.name, "embedded").inc(sum(embedded))
    metrics.CHUNKS.labels(spec.name, "reused").inc(sum(map(len, rows)) - sum(embedded))
    return ChunkedEmbedded(vectors, tokens, rejected, chunks=rows, sent=sent, embedded_chunks=embedded)
