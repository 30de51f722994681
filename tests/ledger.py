"""What the store must hold after a stream of document changes: an oracle for the drills.

The :class:`Ledger` records every change a test publishes, in partition order per
document, and replays them one at a time by the contract's rules: an upsert or delete
applies only when its version is above every version known for the document (stored
or deleted at), and a tombstone deletes whatever is stored while keeping what was
known. However a worker batches, splits, retries or replays them, the store must end
in the state this sequential replay gives.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from psycopg import sql

from segue.control import registry
from segue.storage import connections, model_columns
from tests.harness import change


@dataclass
class Expected:
    """One document's state after the replay: ``body`` None means absent."""

    known: int | None = None
    version: int | None = None
    body: str | None = None


@dataclass(eq=False)
class Ledger:
    """The changes published for a set of documents, and the state they must lead to."""

    records: list[tuple[str, bytes | None]] = field(default_factory=list)
    state: dict[str, Expected] = field(default_factory=dict)

    def upsert(self, doc_id: str, version: int, text: str) -> tuple[str, bytes]:
        record = (doc_id, change(doc_id, text, version))
        self._apply(doc_id, version, text)
        return self._keep(record)

    def delete(self, doc_id: str, version: int) -> tuple[str, bytes]:
        record = (doc_id, change(doc_id, None, version, op="delete"))
        self._apply(doc_id, version, None)
        return self._keep(record)

    def tombstone(self, doc_id: str) -> tuple[str, None]:
        expected = self.state.setdefault(doc_id, Expected())
        expected.version = expected.body = None
        return self._keep((doc_id, None))

    def random_ops(self, rng: random.Random, doc_ids: list[str], count: int, *, max_version: int = 20,
                   tag: str = "") -> list[tuple[str, bytes | None]]:
        """``count`` random changes: mostly upserts at shuffled versions (duplicates too), some deletes and tombstones."""
        out = []
        for n in range(count):
            doc_id = rng.choice(doc_ids)
            roll = rng.random()
            version = rng.randint(1, max_version)
            if roll < 0.75:
                out.append(self.upsert(doc_id, version, f"{doc_id} at version {version}{tag} ({n % 7})"))
            elif roll < 0.9:
                out.append(self.delete(doc_id, version))
            else:
                out.append(self.tombstone(doc_id))
        return out

    def _apply(self, doc_id: str, version: int, text: str | None) -> None:
        expected = self.state.setdefault(doc_id, Expected())
        if expected.known is not None and version <= expected.known:
            return
        expected.known = version
        expected.version, expected.body = (version, text) if text is not None else (None, None)

    def _keep(self, record):
        self.records.append(record)
        return record

    def mismatches(self, harness) -> list[str]:
        """Documents whose stored state differs from the replay (body, version, or a vector not current)."""
        with connections.connect(harness.settings, harness.database_url) as conn:
            models = registry.live_models(conn)
            current = sql.SQL(" AND ").join(
                sql.SQL("{} = content_sha256").format(model_columns.sha_column(m.version)) for m in models)
            rows = conn.execute(
                sql.SQL("SELECT doc_id, version, body, content_sha256, {} FROM documents"
                        " WHERE doc_id = ANY(%s)").format(current),
                (list(self.state),),
            ).fetchall()
        stored = {doc_id: (version, body, sha, complete) for doc_id, version, body, sha, complete in rows}
        wrong = []
        for doc_id, expected in self.state.items():
            found = stored.get(doc_id)
            if expected.body is None:
                if found is not None:
                    wrong.append(f"{doc_id}: expected absent, found version {found[0]}")
            elif found is None:
                wrong.append(f"{doc_id}: expected version {expected.version}, found absent")
            elif (found[0], found[1]) != (expected.version, expected.body):
                wrong.append(f"{doc_id}: expected version {expected.version}, found {found[0]} ({found[1]!r})")
            elif found[2] != hashlib.sha256(expected.body.encode()).digest() or not found[3]:
                wrong.append(f"{doc_id}: version {found[0]} stored, but a vector is not current")
        return wrong
