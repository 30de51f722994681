"""``segue import`` of a chunk table: documents rebuilt from their chunks, the chunk vectors adopted.

A source table of passages (document id, chunk number, text, revision, language, an 8-d
vector), chunk numbers sparse and rows in no order, is imported without a document table:
each document's body is its chunks joined by a blank line in chunk order, each chunk lands in
the adopted chunked model's ``chunks_vN`` at its exact place in that body with its vector bit
for bit, the document's vector is the normalised mean, and the model covers the corpus.
Re-running writes nothing; a document stored at a newer version keeps itself and its chunks; a
killed import resumes after its last page. Then the command line's refusals, and a property
(Hypothesis) over hostile chunk tables: NULL and over-long document ids, NULL and duplicated
chunk numbers, NULL, empty and blank texts, versions out of range, vectors missing, of another
width, all zeros or cancelling out, into a target already holding documents and tombstones of
the same ids. Every row lands exactly or is counted under its reason; nothing else changes.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pgvector.psycopg import register_vector
from psycopg import sql

from segue.control import importer, registry
from segue.control.importer import ImportRefused, Source
from segue.embedding.chunking import ADOPTED_CHUNKS
from segue.storage import connections, model_columns, upgrades

ADOPTED = "legacy-passages"
DIM = 8
DOCUMENTS = 120
MAX_VERSION = 2**63 - 1
UNRELATED_DOCUMENT = ("§unrelated", "published by someone else", 7)
UNRELATED_TOMBSTONE = ("§deleted", 9)


def database(h, name: str) -> str:
    """The harness's database URL, for database ``name``."""
    return urlunsplit(urlsplit(h.database_url)._replace(path=f"/{name}"))


@dataclass(frozen=True)
class Databases:
    source: str
    target: str  # the fixed corpus's Segue database
    hostile: str  # the property's Segue database


@pytest.fixture(scope="module")
def dbs(harness) -> Databases:
    for name in ("chunks_source", "chunks_target", "chunks_hostile"):
        harness.conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    found = Databases(database(harness, "chunks_source"), database(harness, "chunks_target"),
                      database(harness, "chunks_hostile"))
    with psycopg.connect(found.source, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
    for url in (found.target, found.hostile):
        upgrades.upgrade(harness.settings, url)
    return found


def passage(doc: int, n: int) -> str:
    """A chunk's text: multi-line, with characters outside the BMP and a ``%``."""
    return f"doc {doc} part {n} 😀 é%\nsecond line{' tail' * (n % 3)}"


@pytest.fixture(scope="module")
def passages(dbs) -> dict[int, list[tuple[int, str, int, str, np.ndarray]]]:
    """The source table ``passages``: per document its chunks (number, text, revision, lang, vector), in chunk
    order; the table's rows are shuffled and chunk numbers sparse."""
    rng = np.random.default_rng(11)
    corpus: dict[int, list] = {}
    rows = []
    for doc in range(DOCUMENTS):
        numbers = sorted(rng.choice(1000, size=1 + doc % 6, replace=False).tolist())
        corpus[doc] = []
        for n in numbers:
            vector = rng.standard_normal(DIM).astype(np.float32)
            chunk = (n, passage(doc, n), 100 + doc + n % 5, f"lang-{doc}-{n}", vector)
            corpus[doc].append(chunk)
            rows.append((doc, *chunk))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    with psycopg.connect(dbs.source, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"CREATE TABLE passages (doc bigint NOT NULL, n integer NOT NULL, body text, rev bigint,"
                     f" lang text, embedding vector({DIM}))")
        with conn.cursor().copy("COPY passages FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    return corpus


def import_args(dbs: Databases, *extra: str) -> list[str]:
    return ["import", "--source-url", dbs.source, "--table", "passages", "--id-column", "doc", "--chunk-column", "n",
            "--chunk-text-column", "body", "--version-column", "rev", "--metadata-column", "lang",
            "--vector-column", "embedding", "--model", ADOPTED, *extra]


def cli_env(harness, dbs: Databases) -> dict[str, str]:
    return {**harness.env, "SEGUE_DATABASE_URL": dbs.target}


def normalised_mean(vectors: list[np.ndarray]) -> np.ndarray:
    """pgvector's l2_normalize(avg(v)): the mean in float8 kept as float4, then divided by its norm."""
    mean = np.mean(np.asarray(vectors, dtype=np.float64), axis=0).astype(np.float32)
    norm = np.sqrt(np.sum(mean.astype(np.float64) ** 2))
    return (mean.astype(np.float64) / norm).astype(np.float32)


def stored_chunks(conn: psycopg.Connection, version: int) -> dict[str, list[tuple]]:
    """The chunk table of model ``version``: per doc_id its (chunk_no, start, end, tokens, sha, vector bytes)."""
    found = defaultdict(list)
    for doc_id, *row, vector in conn.execute(sql.SQL(
            "SELECT doc_id, chunk_no, start_char, end_char, tokens, chunk_sha256, embedding FROM {}"
            " ORDER BY doc_id, chunk_no").format(model_columns.chunk_table(version)), binary=True).fetchall():
        found[doc_id].append((*row, vector.to_numpy().tobytes()))
    return dict(found)


def test_a_chunk_table_becomes_documents_and_adopted_chunk_vectors(harness, dbs, passages):
    printed = " ".join(harness.segue(*import_args(dbs, "--page-size", "7"), env=cli_env(harness, dbs)).stdout.split())
    rows = sum(map(len, passages.values()))
    assert f"read {rows} rows" in printed and f"wrote {DOCUMENTS} documents from {rows} chunks" in printed, printed
    with connections.connect(harness.settings, dbs.target) as conn:
        register_vector(conn)
        spec = registry.get_model(conn, ADOPTED).spec
        assert (spec.provider, spec.dim, spec.chunked, spec.config["chunking"]) == ("adopted", DIM, True,
                                                                                     ADOPTED_CHUNKS)
        stored = {doc_id: (body, version, metadata, sha, vector.to_numpy(), model_sha)
                  for doc_id, body, version, metadata, sha, vector, model_sha in conn.execute(sql.SQL(
                      "SELECT doc_id, body, version, metadata, content_sha256, {}, {} FROM documents").format(
                      model_columns.vector_column(spec.version), model_columns.sha_column(spec.version)),
                      binary=True).fetchall()}
        chunks = stored_chunks(conn, spec.version)
        coverage = conn.execute("SELECT coverage_pct FROM migration_progress WHERE model = %s", (ADOPTED,)).fetchone()
    assert set(stored) == {str(doc) for doc in passages}
    for doc, expected in passages.items():
        body, version, metadata, sha, vector, model_sha = stored[str(doc)]
        assert body == "\n\n".join(text for _, text, _, _, _ in expected)
        assert version == max(rev for _, _, rev, _, _ in expected)
        assert metadata == {"lang": expected[0][3]}  # the first chunk's
        assert sha == model_sha == hashlib.sha256(body.encode()).digest()
        np.testing.assert_allclose(vector, normalised_mean([v for *_, v in expected]), rtol=1e-6, atol=1e-7)
        found = chunks[str(doc)]
        assert [row[0] for row in found] == list(range(len(expected)))
        for (_, start, end, tokens, chunk_sha, chunk_vector), (_, text, _, _, source_vector) in zip(found, expected):
            assert body[start:end] == text and tokens == 0
            assert chunk_sha == hashlib.sha256(text.encode()).digest()
            assert chunk_vector == source_vector.tobytes()  # bit for bit
    assert float(coverage[0]) == 100.0

    # Again: everything is read, nothing is newer, nothing is written (the chunks' rows are the same rows).
    with connections.connect(harness.settings, dbs.target) as conn:
        before = conn.execute(sql.SQL("SELECT doc_id, chunk_no, xmin::text FROM {} ORDER BY 1, 2").format(
            model_columns.chunk_table(spec.version))).fetchall()
    again = " ".join(harness.segue(*import_args(dbs), env=cli_env(harness, dbs)).stdout.split())
    assert f"wrote 0 documents from 0 chunks, {DOCUMENTS} already stored at the same or a newer version" in again
    with connections.connect(harness.settings, dbs.target) as conn:
        assert conn.execute(sql.SQL("SELECT doc_id, chunk_no, xmin::text FROM {} ORDER BY 1, 2").format(
            model_columns.chunk_table(spec.version))).fetchall() == before


def test_newer_stored_documents_are_left_alone_and_newer_rows_replace_all_chunks(harness, dbs, passages):
    with connections.connect(harness.settings, dbs.target) as conn:
        version = registry.get_model(conn, ADOPTED).spec.version
        conn.execute("UPDATE documents SET version = 10000, body = 'edited in Segue',"
                     " content_sha256 = sha256(convert_to('edited in Segue', 'UTF8')) WHERE doc_id = '5'")
        kept = stored_chunks(conn, version)["5"]
    with psycopg.connect(dbs.source, autocommit=True) as source:
        source.execute("UPDATE passages SET body = 'rewritten, older than Segue', rev = 9999 WHERE doc = 5")
        # Document 11 is revised at the source: fewer chunks, new text; its old chunks must all go.
        source.execute("DELETE FROM passages WHERE doc = 11 AND n <> (SELECT min(n) FROM passages WHERE doc = 11)")
        source.execute("UPDATE passages SET body = 'the only part left', rev = 5000 WHERE doc = 11")
    printed = " ".join(harness.segue(*import_args(dbs), env=cli_env(harness, dbs)).stdout.split())
    assert f"wrote 1 documents from 1 chunks, {DOCUMENTS - 1} already stored" in printed, printed
    with connections.connect(harness.settings, dbs.target) as conn:
        assert conn.execute("SELECT body, version FROM documents WHERE doc_id = '5'").fetchone() == (
            "edited in Segue", 10000)
        chunks = stored_chunks(conn, version)
        assert chunks["5"] == kept
        assert conn.execute("SELECT body, version FROM documents WHERE doc_id = '11'").fetchone() == (
            "the only part left", 5000)
        assert [row[:4] for row in chunks["11"]] == [(0, 0, len("the only part left"), 0)]


def test_a_killed_import_resumes_after_its_last_page(harness, dbs, passages, monkeypatch):
    harness.conn.execute("CREATE DATABASE chunks_resumed")
    target = database(harness, "chunks_resumed")
    upgrades.upgrade(harness.settings, target)
    source = Source(url=dbs.source, table="passages", id_column="doc", chunk_column="n", chunk_text_column="body",
                    version_column="rev", vector_column="embedding")
    written = importer._page
    pages = []

    def dies_on_the_fourth(conn, *args):
        if len(pages) == 3:
            raise KeyboardInterrupt
        written(conn, *args)
        pages.append(args)

    monkeypatch.setattr(importer, "_page", dies_on_the_fourth)
    with connections.connect(harness.settings, target) as conn:
        with pytest.raises(KeyboardInterrupt):
            importer.run_import(conn, source, model=ADOPTED, page_size=10, rate=None, console=None)
        monkeypatch.setattr(importer, "_page", written)
        done = conn.execute("SELECT rows_read FROM import_progress").fetchone()[0]
        assert done >= 30
        report = importer.run_import(conn, source, model=ADOPTED, page_size=10, rate=None, console=None)
        with psycopg.connect(dbs.source) as source_conn:
            rows = source_conn.execute("SELECT count(*) FROM passages").fetchone()[0]
        assert report.read == rows - done  # from the watermark on, not from the start
        assert conn.execute("SELECT count(*) FROM documents").fetchone()[0] == DOCUMENTS
        resumed = conn.execute("SELECT doc_id, body, embedding_v1::text FROM documents ORDER BY doc_id").fetchall()
    with connections.connect(harness.settings, dbs.target) as conn:
        version = registry.get_model(conn, ADOPTED).spec.version
        whole = conn.execute(sql.SQL("SELECT doc_id, body, {}::text FROM documents WHERE doc_id <> '5' ORDER BY doc_id")
                             .format(model_columns.vector_column(version))).fetchall()
    assert [row for row in resumed if row[0] != "5"] == whole


@pytest.mark.parametrize(("extra", "said"), [
    (["--text-column", "body"], "Error: a chunk table's text is its --chunk-text-column: leave out --text-column"),
    (["--follow"], "Error: --follow does not follow a chunk table"),
])
def test_the_command_line_refuses_in_one_line(harness, dbs, passages, extra, said):
    done = harness.segue(*import_args(dbs, *extra), env=cli_env(harness, dbs), check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip().splitlines()[0]]
    assert done.stderr.strip().startswith(said), done.stderr


def test_a_chunk_column_must_be_an_integer_and_go_with_its_text(harness, dbs, passages):
    with connections.connect(harness.settings, dbs.target) as conn:
        with pytest.raises(ImportRefused, match="--chunk-column lang is text: use an integer column"):
            importer.run_import(conn, Source(url=dbs.source, table="passages", id_column="doc", chunk_column="lang",
                                             chunk_text_column="body"), model=None, page_size=10, rate=None,
                                console=None)
        with pytest.raises(ImportRefused, match="--chunk-column and --chunk-text-column go together"):
            importer.run_import(conn, Source(url=dbs.source, table="passages", id_column="doc", chunk_column="n",
                                             text_columns=("body",)), model=None, page_size=10, rate=None,
                                console=None)


def test_postgresql_text_cannot_hold_a_nul_so_none_reaches_an_import(dbs):
    with psycopg.connect(dbs.source, autocommit=True) as conn, pytest.raises(psycopg.DataError):
        conn.execute("SELECT %s::text", ("nul \x00 inside",))


# -- the property ------------------------------------------------------------------------------------------
TEXT = "aé😀%'\\\x01 \t\n\u00a0\u2003\u3000"  # white space for Python and for Segue alike, and not
IDS = {"bigint": st.integers(0, 3), "text": st.sampled_from(["a", "b", "é😀", "%'\\", "", "x" * 513])}
FLOATS = st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])  # sums and means exact in float8


def sometimes_none(values: st.SearchStrategy) -> st.SearchStrategy:
    """``values``, or None one time in eight (so that most rows make it past the first check)."""
    return st.integers(0, 7).flatmap(lambda n: st.none() if n == 0 else values)


VECTORS = {
    "vector(3)": sometimes_none(st.lists(FLOATS, min_size=3, max_size=3) | st.just([0.0, 0.0, 0.0])
                                | st.just("mirror")),
    "vector": sometimes_none(st.lists(FLOATS, min_size=1, max_size=4) | st.just("mirror")),
}


@dataclass(frozen=True)
class Row:
    id: Any
    chunk: int | None
    text: str | None
    version: int | None
    lang: str | None
    vector: list[float] | None
    seeded: tuple[str, int] | None


@dataclass(frozen=True)
class Case:
    id_type: str
    chunk_type: str
    versioned: bool
    metadata: bool
    vector_type: str | None
    rows: tuple[Row, ...]
    page_size: int


@st.composite
def cases(draw) -> Case:
    id_type, chunk_type = draw(st.sampled_from(sorted(IDS))), draw(st.sampled_from(["smallint", "integer", "bigint"]))
    versioned, metadata = draw(st.booleans()), draw(st.booleans())
    vector_type = draw(st.sampled_from([None, *VECTORS]))
    rows: list[Row] = []
    for _ in range(draw(st.integers(0, 14))):
        vector = draw(VECTORS[vector_type]) if vector_type else None
        if vector == "mirror":  # the previous row's vector negated: two chunks of a document can cancel out
            vector = None if not rows or rows[-1].vector is None else [-x for x in rows[-1].vector]
        again = rows and draw(st.integers(0, 3)) == 0  # the previous row's document and chunk number once more
        rows.append(Row(
            id=rows[-1].id if again else draw(sometimes_none(IDS[id_type])),
            chunk=rows[-1].chunk if again else draw(sometimes_none(st.integers(-1, 3))),
            text=draw(sometimes_none(st.text(TEXT, max_size=4))),
            version=draw(sometimes_none(st.integers(-1, 3) | st.just(MAX_VERSION))) if versioned else None,
            lang=draw(st.none() | st.sampled_from(["en", "fr"])) if metadata else None,
            vector=vector,
            seeded=draw(st.none() | st.tuples(st.sampled_from(["document", "tombstone"]), st.sampled_from([-1, 0, 1]))),
        ))
    return Case(id_type, chunk_type, versioned, metadata, vector_type, tuple(rows), draw(st.integers(1, 4)))


def version_of(row: Row) -> int | None:
    """The version Segue gives the row: 0 without one, None when out of range."""
    return 0 if row.version is None else row.version if row.version >= 0 else None


@dataclass
class Expected:
    skipped: Counter
    written: dict[str, list[Row]]  # doc_id: its chunks' rows, in chunk order
    superseded: int
    vectors_not_adopted: Counter
    documents: dict[str, tuple]  # doc_id: (body, version, metadata, has a vector)
    vectors: dict[str, np.ndarray]
    chunks: dict[str, list[tuple]]
    tombstones: dict[str, int]
    dim: int | None


def vector_missed(row: Row, dim: int) -> str | None:
    if row.vector is None:
        return "no vector"
    if len(row.vector) != dim:
        return f"dimension mismatch (not {dim})"
    return None if any(row.vector) else "all-zero vector"


def expect(case: Case) -> tuple[Expected, dict[str, tuple[str, int]]]:
    """The outcome of importing ``case`` into a target seeded as its rows say; and that seed."""
    skipped, placed = Counter(), defaultdict(list)
    for row in case.rows:
        doc_id = None if row.id is None else str(row.id)
        if doc_id is None:
            skipped[importer.NO_ID] += 1
        elif not 1 <= len(doc_id) <= 512:
            skipped[importer.BAD_DOC_ID] += 1
        elif row.chunk is None:
            skipped[importer.NO_CHUNK_NO] += 1
        elif row.text is None or not row.text.strip():
            skipped[importer.NO_TEXT] += 1
        elif version_of(row) is None:
            skipped[importer.BAD_VERSION] += 1
        else:
            placed[doc_id, row.chunk].append(row)
    kept = defaultdict(list)
    for (doc_id, _), rows in placed.items():
        ranked = sorted(rows, key=lambda row: (-version_of(row), row.text.encode()))
        assume(len(ranked) == 1 or (version_of(ranked[0]), ranked[0].text) != (version_of(ranked[1]), ranked[1].text))
        skipped[importer.DUPLICATE_CHUNK] += len(rows) - 1
        kept[doc_id].append(ranked[0])
    widths = Counter(len(row.vector) for row in case.rows if row.vector is not None)
    dim = 3 if case.vector_type == "vector(3)" else min(widths, key=lambda w: (-widths[w], w)) if widths else None
    seed, written, superseded = {}, {}, 0
    documents = {UNRELATED_DOCUMENT[0]: (UNRELATED_DOCUMENT[1], UNRELATED_DOCUMENT[2], {}, False)}
    tombstones = dict([UNRELATED_TOMBSTONE])
    first_rows = {}
    for row in case.rows:
        first_rows.setdefault(None if row.id is None else str(row.id), row)
    for doc_id, rows in kept.items():
        rows.sort(key=lambda row: row.chunk)
        newest = max(version_of(row) for row in rows)
        seeded = first_rows[doc_id].seeded
        if seeded and 0 <= newest + seeded[1] <= MAX_VERSION:
            seed[doc_id] = (seeded[0], newest + seeded[1])
        kind, seeded_version = seed.get(doc_id, (None, None))
        if kind == "document":
            documents[doc_id] = ("stored before", seeded_version, {}, False)
        elif kind == "tombstone":
            tombstones[doc_id] = seeded_version
        if kind == "tombstone" and seeded_version > newest:
            skipped[importer.DELETED_NEWER] += len(rows)
        elif kind == "document" and seeded_version >= newest:
            superseded += 1
        else:
            written[doc_id] = rows
            tombstones.pop(doc_id, None)
    vectors_not_adopted, vectors, chunks = Counter(), {}, {}
    for doc_id, rows in written.items():
        body = "\n\n".join(row.text for row in rows)
        why = None
        if case.vector_type:
            why = next((why for why in (vector_missed(row, dim) for row in rows) if why), None)
            if why is None and not np.any(np.mean(np.asarray([row.vector for row in rows], dtype=np.float64), 0)):
                why = importer.ZERO_MEAN
        vectors_not_adopted.update([why] if why else [])
        adopted = case.vector_type is not None and why is None
        documents[doc_id] = (body, max(version_of(row) for row in rows),
                             {"Lang": rows[0].lang} if case.metadata else {}, adopted)
        if adopted:
            vectors[doc_id] = normalised_mean([np.float32(row.vector) for row in rows])
            start, chunks[doc_id] = 0, []
            for n, row in enumerate(rows):
                chunks[doc_id].append((n, start, start + len(row.text), 0, hashlib.sha256(row.text.encode()).digest(),
                                       np.float32(row.vector).tobytes()))
                start += len(row.text) + 2
    return Expected(skipped, written, superseded, vectors_not_adopted, documents, vectors, chunks, tombstones,
                    dim), seed


def create_source(conn: psycopg.Connection, case: Case) -> None:
    """The case's table ``Passages %`` with quoted, mixed-case, ``%``-holding column names."""
    columns = [f'"Doc Id" {case.id_type}', f'"Chunk%" {case.chunk_type}', '"Text" text']
    columns += ['"Rev" bigint'] * case.versioned + ['"Lang" text'] * case.metadata
    columns += [f'"Emb" {case.vector_type}'] * (case.vector_type is not None)
    conn.execute(f'CREATE TABLE "Passages %" ({", ".join(columns)})')
    with conn.cursor() as cursor, cursor.copy('COPY "Passages %" FROM STDIN') as copy:
        for row in case.rows:
            values = [row.id, row.chunk, row.text] + [row.version] * case.versioned + [row.lang] * case.metadata
            values += [None if row.vector is None else np.float32(row.vector)] * (case.vector_type is not None)
            copy.write_row(values)


def seed_target(conn: psycopg.Connection, seed: dict[str, tuple[str, int]]) -> None:
    """Empty the target, then give it the unrelated document and tombstone and the case's seeded ones."""
    conn.execute("DELETE FROM documents")  # not TRUNCATE: the corpus counters' triggers see it (and chunks go)
    conn.execute("TRUNCATE document_tombstones, import_progress, migration_changelog")
    documents = [UNRELATED_DOCUMENT] + [(d, "stored before", v) for d, (kind, v) in seed.items() if kind == "document"]
    tombstones = [UNRELATED_TOMBSTONE] + [(d, v) for d, (kind, v) in seed.items() if kind == "tombstone"]
    with conn.cursor() as cursor:
        cursor.executemany("INSERT INTO documents (doc_id, body, version, content_sha256, metadata)"
                           " VALUES (%s, %s, %s, sha256(convert_to(%s, 'UTF8')), '{}')",
                           [(d, body, v, body) for d, body, v in documents])
        cursor.executemany("INSERT INTO document_tombstones (doc_id, version) VALUES (%s, %s)", tombstones)


def target_state(conn: psycopg.Connection, model: str | None) -> tuple:
    """The target's documents ({doc_id: (body, version, metadata, has a current vector)}), their vectors, chunks
    and tombstones."""
    spec = None
    if model is not None and any(m.spec.name == model for m in registry.list_models(conn)):
        spec = registry.get_model(conn, model).spec
    vector, current = sql.SQL("NULL::vector"), sql.SQL("false")
    if spec is not None:
        vector = model_columns.vector_column(spec.version)
        current = sql.SQL("{} IS NOT DISTINCT FROM content_sha256").format(model_columns.sha_column(spec.version))
    rows = conn.execute(sql.SQL("SELECT doc_id, body, version, metadata, {}, {}, content_sha256 FROM documents")
                        .format(current, vector), binary=True).fetchall()
    assert all(sha == hashlib.sha256(body.encode()).digest() for _, body, _, _, _, _, sha in rows)
    documents = {d: (body, v, metadata, adopted) for d, body, v, metadata, adopted, _, _ in rows}
    vectors = {d: vec.to_numpy().tobytes() for d, _, _, _, adopted, vec, _ in rows if adopted}
    chunks = stored_chunks(conn, spec.version) if spec is not None else {}
    return documents, vectors, chunks, dict(conn.execute("SELECT doc_id, version FROM document_tombstones").fetchall())


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=cases())
def test_every_row_of_a_hostile_chunk_table_lands_exactly_or_is_counted_under_its_reason(harness, dbs, case):
    expected, seed = expect(case)
    model = f"adopted-chunks-{expected.dim}" if case.vector_type else None
    source = Source(url=dbs.source, table="Passages %", id_column="Doc Id", chunk_column="Chunk%",
                    chunk_text_column="Text", version_column="Rev" if case.versioned else None,
                    metadata_columns=("Lang",) if case.metadata else (),
                    vector_column="Emb" if case.vector_type else None)
    with psycopg.connect(dbs.source, autocommit=True) as owner, \
            connections.connect(harness.settings, dbs.hostile) as conn:
        register_vector(owner)
        register_vector(conn)
        try:
            create_source(owner, case)
            seed_target(conn, seed)
            if case.vector_type and expected.dim is None:
                before = target_state(conn, None)
                with pytest.raises(ImportRefused, match="holds no vector to adopt"):
                    importer.run_import(conn, source, model=model, page_size=case.page_size, rate=None, console=None)
                assert target_state(conn, None) == before
                return
            report = importer.run_import(conn, source, model=model, page_size=case.page_size, rate=None, console=None)
            for why in (+report.skipped) + (+report.vectors_not_adopted):
                event(why)
            event(f"superseded: {bool(report.superseded)}, written: {bool(report.written)}")
            assert report.read == len(case.rows)
            assert +report.skipped == +expected.skipped
            assert (report.written, report.superseded) == (len(expected.written), expected.superseded)
            assert report.chunks == sum(map(len, expected.written.values()))
            assert +report.vectors_not_adopted == +expected.vectors_not_adopted
            documents, vectors, chunks, tombstones = target_state(conn, model)
            assert (documents, tombstones) == (expected.documents, expected.tombstones)
            assert chunks == expected.chunks
            assert set(vectors) == set(expected.vectors)
            for doc_id, vector in vectors.items():
                np.testing.assert_allclose(np.frombuffer(vector, np.float32), expected.vectors[doc_id], rtol=1e-6)
            for doc_id, rows in chunks.items():
                body = documents[doc_id][0]
                texts = [row.text for row in expected.written[doc_id]]
                assert [body[start:end] for _, start, end, *_ in rows] == texts
            again = importer.run_import(conn, source, model=model, page_size=case.page_size, rate=None, console=None)
            assert (again.written, again.superseded, again.chunks) == (0, report.written + report.superseded, 0)
            assert +again.skipped == +expected.skipped
            assert target_state(conn, model) == (documents, vectors, chunks, tombstones)
        finally:
            owner.execute('DROP TABLE IF EXISTS "Passages %"')
