"""Tests of segue.devtools.modelkit and segue.embedding.engine with real models (MiniLM and tiny built ones), no mocks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from segue.devtools.corpus import scifact_documents
from segue.devtools.modelkit import build_tiny_transformer, distill_static, minilm_path
from segue.embedding import providers
from segue.embedding.engine import (
    DimensionMismatch,
    EmbeddingEngine,
    FingerprintMismatch,
    ModelSpec,
)
from segue.embedding.providers import OptionsError, inspect
from tests.modelfactory import tiny_static, tiny_transformer_a, tiny_transformer_b

REPO = Path(__file__).resolve().parents[1]
SHORT_TEXTS = [
    "p53",
    "What causes type 2 diabetes?",
    "COVID-19 vaccine efficacy in older adults",
    "Ünïcödé têxt — with symbols ☃ and emoji 🚀",
    "",
]
_versions = itertools.count(1)


def spec_for(path: Path | str, name: str, **overrides) -> ModelSpec:
    """A registry row for the model at ``path`` as the registry would write it, with optional edits."""
    profile = inspect(str(path))
    row = dict(version=next(_versions), name=name, source=str(path), **dataclasses.asdict(profile))
    return ModelSpec(**{**row, **overrides})


def varied_texts() -> list[str]:
    """Short, medium and long texts, in no particular length order."""
    base = SHORT_TEXTS + [
        "Cells divide.",
        "The mitochondrion is the powerhouse of the cell, " * 3,
        "Randomised controlled trial of aspirin for the primary prevention of cardiovascular events " * 6,
        "x",
        "Gene expression profiling of breast tumours identifies distinct subtypes.",
    ]
    return base + [text.upper() for text in base[5:]]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_a(models_dir) -> Path:
    return tiny_transformer_a(models_dir)


@pytest.fixture(scope="module")
def static_dir(models_dir) -> Path:
    return tiny_static(models_dir)


@pytest.fixture(scope="module")
def engine():
    engine = EmbeddingEngine(device="cpu", batch_size=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def minilm_spec() -> ModelSpec:
    return spec_for(minilm_path(), "minilm")


@pytest.fixture(scope="module")
def scifact_texts() -> list[str]:
    """14 abstracts, the longest of the first 300 (~800 tokens, so it is truncated), and short texts."""
    abstracts = [doc.text for doc in scifact_documents(300)]
    return abstracts[:14] + [max(abstracts, key=len)] + SHORT_TEXTS


def test_minilm_matches_sentence_transformers(engine, minilm_spec, scifact_texts):
    from sentence_transformers import SentenceTransformer

    reference_model = SentenceTransformer(str(minilm_path()), device="cpu")
    assert len(reference_model.tokenizer(scifact_texts[14])["input_ids"]) > 2 * minilm_spec.max_tokens

    asyncio.run(engine.ensure_loaded([minilm_spec]))
    vectors = asyncio.run(engine.embed(minilm_spec, scifact_texts, priority=1))
    reference = reference_model.encode(scifact_texts, normalize_embeddings=True)

    assert vectors.dtype == np.float32 and vectors.shape == (len(scifact_texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cosine_rows(vectors, reference).min() >= 0.999


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "static"])
def test_tiny_models_match_their_reference_encoders(engine, tiny_a, static_dir, tmp_path, pooling):
    texts = varied_texts()
    if pooling == "static":
        from model2vec import StaticModel

        source = static_dir
        reference = StaticModel.from_pretrained(static_dir).encode(texts, normalize=True)
    else:
        from sentence_transformers import SentenceTransformer

        source = tiny_a if pooling == "mean" else build_tiny_transformer(tmp_path / pooling, pooling=pooling)
        reference = SentenceTransformer(str(source), device="cpu").encode(texts, normalize_embeddings=True)
    embedded = engine.embed_counted_sync(spec_for(source, f"tiny-{pooling}"), texts)
    # A text the model has no token for (the empty one, for the static model) gets no vector: rejected, not zeros.
    empty = {i for i, vector in enumerate(reference) if not vector.any()}
    assert set(embedded.rejected) == empty and (pooling == "static") == bool(empty)
    assert all(why.startswith("zero:") for why in embedded.rejected.values())
    np.testing.assert_allclose(embedded.vectors, reference, atol=1e-5)


def test_profiles(tiny_a, models_dir, static_dir, minilm_spec):
    a = inspect(str(tiny_a))
    assert (a.provider, a.dim, a.max_tokens) == ("transformer", 32, 128)
    assert a.config == {"pooling": "mean", "normalize": True, "dtype": "float32", "attention": "sdpa", "prefix": ""}
    b = inspect(str(tiny_transformer_b(models_dir)))
    assert (b.provider, b.dim, b.config["pooling"]) == ("transformer", 48, "mean")
    static = inspect(str(static_dir))
    assert (static.provider, static.dim, static.config) == ("static", 16, {"normalize": True})
    assert (minilm_spec.provider, minilm_spec.dim, minilm_spec.config["pooling"], minilm_spec.max_tokens) == (
        "transformer", 384, "mean", 256,
    )
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        inspect("segue-tests/no-such-model")


def test_fingerprint_is_deterministic(tiny_a, tmp_path):
    first = inspect(str(tiny_a)).fingerprint
    assert inspect(str(tiny_a)).fingerprint == first
    assert inspect(str(build_tiny_transformer(tmp_path / "again"))).fingerprint == first
    other_process = subprocess.run(
        [sys.executable, "-c", f"from segue.embedding.providers import inspect; print(inspect({str(tiny_a)!r}).fingerprint)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert other_process.stdout.strip() == first


def test_fingerprint_changes_with_weights_and_settings(tiny_a, tmp_path):
    def edited(name: str, edit) -> str:
        copy = shutil.copytree(tiny_a, tmp_path / name)
        edit(copy)
        return inspect(str(copy)).fingerprint

    def drop_normalize(folder: Path) -> None:
        modules = json.loads((folder / "modules.json").read_text())
        (folder / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))

    def shorter_limit(folder: Path) -> None:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))

    fingerprints = [
        inspect(str(tiny_a)).fingerprint,
        inspect(str(build_tiny_transformer(tmp_path / "seed1", seed=1))).fingerprint,
        inspect(str(build_tiny_transformer(tmp_path / "cls", pooling="cls"))).fingerprint,
        edited("unnormalized", drop_normalize),
        edited("limit64", shorter_limit),
    ]
    assert len(set(fingerprints)) == len(fingerprints)


def test_distill_static_reuses_a_finished_model(tiny_a, static_dir):
    before = (static_dir / "model.safetensors").stat().st_mtime_ns
    assert distill_static(str(tiny_a), static_dir, dims=16) == static_dir
    assert (static_dir / "model.safetensors").stat().st_mtime_ns == before


def test_ensure_loaded_reports_and_logs(tiny_a, static_dir, caplog):
    engine = EmbeddingEngine(device="cpu")
    specs = [spec_for(tiny_a, "tiny-a"), spec_for(static_dir, "tiny-static")]
    try:
        with caplog.at_level(logging.INFO, logger="segue.embedding.engine"):
            took = asyncio.run(engine.ensure_loaded(specs + specs))
        assert set(took) == engine.loaded() == {spec.version for spec in specs}
        assert asyncio.run(engine.ensure_loaded(specs)) == {}
        assert f"loaded model tiny-a v{specs[0].version} (transformer, 32) on cpu in " in caplog.text
        assert f"loaded model tiny-static v{specs[1].version} (static, 16) on cpu in " in caplog.text
        empty = asyncio.run(engine.embed(specs[0], [], priority=0))
        assert empty.shape == (0, 32) and empty.dtype == np.float32
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(engine.embed(specs[0], ["too late"], priority=0))


def test_changed_weights_are_refused(engine, tiny_a, models_dir):
    moved = spec_for(tiny_a, "tiny-a", source=str(tiny_transformer_b(models_dir)))
    with pytest.raises(FingerprintMismatch, match=f"the model at {moved.source} changed since registration"):
        asyncio.run(engine.ensure_loaded([moved]))
    assert moved.version not in engine.loaded()


@pytest.mark.parametrize("model", ["tiny-a", "tiny-static"])
def test_dimension_guard(engine, tiny_a, static_dir, model):
    source, true_dim = (tiny_a, 32) if model == "tiny-a" else (static_dir, 16)
    spec = spec_for(source, model, dim=true_dim + 1)
    expected = rf"model '{model}' \(v{spec.version}\) produced {true_dim}-d vectors but is registered as {true_dim + 1}-d"
    with pytest.raises(DimensionMismatch, match=expected):
        asyncio.run(engine.embed(spec, ["some text"], priority=1))
    with pytest.raises(DimensionMismatch, match=expected):
        engine.embed_sync(spec, ["some text"])


def test_urgent_request_overtakes_queued_backfill(tiny_a):
    engine = EmbeddingEngine(device="cpu", batch_size=2)
    spec = spec_for(tiny_a, "tiny-a")
    backfill = [f"backfill document {i} about protein folding and enzyme kinetics" for i in range(200)]

    async def scenario() -> list[str]:
        await engine.ensure_loaded([spec])
        finished: list[str] = []

        async def request(label: str, texts: list[str], priority: int) -> None:
            await engine.embed(spec, texts, priority=priority)
            finished.append(label)

        low = asyncio.create_task(request("backfill", backfill, 2))
        await asyncio.sleep(0)  # the backfill's 100 chunks are now queued
        high = asyncio.create_task(request("read-miss", ["urgent query"], 0))
        await asyncio.gather(low, high)
        return finished

    before = {priority: engine_waits(priority) for priority in ("read_miss", "backfill")}
    try:
        assert asyncio.run(scenario()) == ["read-miss", "backfill"]
    finally:
        engine.close()
    (miss_chunks, miss_wait), (backfill_chunks, backfill_wait) = (
        tuple(after - earlier for after, earlier in zip(engine_waits(priority), before[priority]))
        for priority in ("read_miss", "backfill"))
    assert (miss_chunks, backfill_chunks) == (1, 100)  # every chunk's wait is observed, under its priority
    assert miss_wait < backfill_wait / backfill_chunks  # the miss waited less than a backfill chunk on average


def engine_waits(priority: str) -> tuple[int, float]:
    """Chunks observed by ``segue_engine_wait_seconds`` for ``priority``, and their total wait."""
    from segue import metrics

    sample = functools.partial(metrics.REGISTRY.get_sample_value, labels={"priority": priority})
    return int(sample("segue_engine_wait_seconds_count") or 0), sample("segue_engine_wait_seconds_sum") or 0.0


@pytest.mark.parametrize("model", ["tiny-a", "tiny-static", "minilm"])
def test_batched_equals_one_at_a_time(engine, tiny_a, static_dir, minilm_spec, model):
    spec = {"tiny-a": lambda: spec_for(tiny_a, model), "tiny-static": lambda: spec_for(static_dir, model),
            "minilm": lambda: minilm_spec}[model]()
    texts = varied_texts()
    batched = asyncio.run(engine.embed_counted(spec, texts, priority=2))
    single = [engine.embed_counted_sync(spec, [text]) for text in texts]
    assert batched.vectors.shape == (len(texts), spec.dim)
    # A static model has no vector for a text without known tokens: rejected alone and in a batch alike.
    assert set(batched.rejected) == {i for i, one in enumerate(single) if one.rejected}
    usable = [i for i in range(len(texts)) if i not in batched.rejected]
    assert cosine_rows(batched.vectors[usable], np.stack([single[i].vectors[0] for i in usable])).min() >= 0.9999
    np.testing.assert_allclose(batched.vectors, engine.embed_counted_sync(spec, texts).vectors, atol=1e-6)


def test_a_job_that_raises_anything_settles_its_caller_and_the_engine_serves_on(tiny_a):
    engine = EmbeddingEngine(device="cpu")
    spec = spec_for(tiny_a, "tiny-a")

    def exits():
        raise SystemExit("a library called sys.exit")

    async def scenario():
        with pytest.raises(RuntimeError, match="raised SystemExit: a library called sys.exit"):
            await engine._submit(1, exits)  # the worker-thread job itself, as embed() queues it
        return await engine.embed(spec, ["still serving"], priority=1)

    try:
        assert asyncio.run(scenario()).shape == (1, spec.dim)
        assert engine.alive
    finally:
        engine.close()


def test_a_gone_engine_thread_is_reported_not_waited_on(tiny_a):
    """Whatever stops the thread, callers get EngineStopped at once and ``alive`` turns False."""
    from segue.embedding.engine import _Job
    from segue.errors import EngineStopped

    engine = EmbeddingEngine(device="cpu")
    spec = spec_for(tiny_a, "tiny-a")
    try:
        engine._jobs.put(_Job(-1, -1, None, None))  # stop the thread without closing the engine
        engine._worker.join(timeout=10)
        assert not engine.alive
        with pytest.raises(EngineStopped, match="thread is gone"):
            asyncio.run(engine.embed(spec, ["nobody serves this"], priority=1))
    finally:
        engine.close()


def test_a_model_that_cannot_load_is_unavailable_not_bad_input(engine, tiny_a, tmp_path):
    from segue.errors import ModelUnavailable

    gone = tmp_path / "moved-away"
    shutil.copytree(tiny_a, gone)
    spec = spec_for(gone, "tiny-moved")
    shutil.rmtree(gone)
    with pytest.raises(ModelUnavailable, match=rf"'tiny-moved' \(v{spec.version}\) cannot be loaded from {gone}"):
        asyncio.run(engine.ensure_loaded([spec]))
    with pytest.raises(ModelUnavailable):
        asyncio.run(engine.embed(spec, ["text"], priority=1))


def test_retired_models_are_unloaded(tiny_a, static_dir):
    engine = EmbeddingEngine(device="cpu")
    old, new = spec_for(static_dir, "old"), spec_for(tiny_a, "new")
    try:
        asyncio.run(engine.ensure_loaded([old, new]))
        assert asyncio.run(engine.unload(retired=[old.version])) == {old.version}
        assert engine.loaded() == {new.version}
        assert asyncio.run(engine.unload(retired=[old.version])) == set()  # gone already
        # The newest model is retired too when its migration is aborted.
        assert asyncio.run(engine.unload(retired=[old.version, new.version])) == {new.version}
        assert engine.loaded() == set()
    finally:
        engine.close()


def test_a_model_loading_holds_up_no_forward_pass_of_a_loaded_one(tiny_a, static_dir, monkeypatch):
    """A migration's new model loads while the old one keeps embedding: in a worker (read misses, changes) and in
    a reader warming the new model (searches on the old)."""
    engine = EmbeddingEngine(device="cpu")
    old, new = spec_for(static_dir, "old"), spec_for(tiny_a, "new")
    loading, may_finish = threading.Event(), threading.Event()
    real_load = providers.load

    def slow_load(spec, device):
        if spec.version == new.version:
            loading.set()
            assert may_finish.wait(30), "the old model's pass waited for the new model's load"
        return real_load(spec, device)

    monkeypatch.setattr(providers, "load", slow_load)
    try:
        asyncio.run(engine.ensure_loaded([old]))
        load = threading.Thread(target=lambda: asyncio.run(engine.ensure_loaded([new])))
        load.start()
        assert loading.wait(30)
        vectors = engine.embed_sync(old, ["p53 regulates the cell cycle"])  # in this thread, while `new` loads
        urgent = asyncio.run(engine.embed(old, ["a read miss"], priority=0))  # on the engine thread
        assert new.version not in engine.loaded()
        may_finish.set()
        load.join(30)
        assert vectors.shape == (1, old.dim) and urgent.shape == (1, old.dim)
        assert engine.loaded() == {old.version, new.version}
    finally:
        may_finish.set()
        engine.close()


def test_provider_options_are_part_of_the_identity(tiny_a):
    default = inspect(str(tiny_a))
    # Options at their defaults leave the identity as it was before the option existed.
    explicit = inspect(str(tiny_a), options={"dtype": "float32", "attention": "sdpa", "prefix": ""})
    assert explicit.fingerprint == default.fingerprint
    variants = [inspect(str(tiny_a), options=option).fingerprint
                for option in ({"dtype": "bfloat16"}, {"attention": "eager"}, {"prefix": "passage: "})]
    assert len({default.fingerprint, *variants}) == 4
    with pytest.raises(OptionsError, match="takes no option colour"):
        inspect(str(tiny_a), options={"colour": "red"})
    with pytest.raises(OptionsError, match="option dtype: must be one of float32, float16, bfloat16, not 'int4'"):
        inspect(str(tiny_a), options={"dtype": "int4"})
    with pytest.raises(OptionsError, match="'static' takes no option dtype"):
        inspect(str(tiny_static(tiny_a.parent)), options={"dtype": "float16"})


def test_a_registered_dtype_prefix_and_attention_are_what_runs(engine, tiny_a):
    texts = varied_texts()
    plain = engine.embed_sync(spec_for(tiny_a, "plain"), texts)
    prefixed = engine.embed_sync(spec_for(tiny_a, "prefixed", **profile_of(tiny_a, prefix="query: ")), texts)
    np.testing.assert_allclose(prefixed, engine.embed_sync(spec_for(tiny_a, "plain"), ["query: " + t for t in texts]),
                               atol=1e-5)
    assert cosine_rows(prefixed, plain).min() < 0.999  # the prefix does change the vectors
    eager = engine.embed_sync(spec_for(tiny_a, "eager", **profile_of(tiny_a, attention="eager")), texts)
    assert cosine_rows(eager, plain).min() >= 0.9999
    half = engine.embed_sync(spec_for(tiny_a, "bf16", **profile_of(tiny_a, dtype="bfloat16")), texts)
    assert 0.98 <= cosine_rows(half, plain).min() < 1.0  # bfloat16 weights: close, not the same vectors


def profile_of(path, **options) -> dict:
    """A spec's fields for the model at ``path`` registered with ``options``."""
    profile = inspect(str(path), options=options)
    return {"config": profile.config, "fingerprint": profile.fingerprint}


def test_counting_tokens_before_truncation(engine, tiny_a, static_dir, scifact_texts):
    spec = spec_for(tiny_a, "tiny-a")
    counts = engine.count_tokens(spec, ["p53", scifact_texts[14]])
    assert counts[0] == 4  # [CLS] p ##53 [SEP]
    assert counts[1] > spec.max_tokens  # the long abstract is over the 128-token limit, and says so
    assert engine.count_tokens(spec_for(static_dir, "tiny-static"), ["p53"])[0] >= 1


@pytest.mark.parametrize("prefix", ["", "passage: "])
def test_one_tokenization_gives_the_count_and_the_tokenizers_own_truncation(tiny_a, scifact_texts, prefix):
    spec = spec_for(tiny_a, "tiny-a")
    embedder = providers.load(dataclasses.replace(spec, config={**spec.config, "prefix": prefix}), "cpu")
    texts = ["p53", *scifact_texts[10:20]]
    prepared = embedder.prepare(texts)
    ids, mask = (tensor.numpy() for tensor in prepared.inputs)
    expected = AutoTokenizer.from_pretrained(tiny_a)([prefix + text for text in texts], padding=True, truncation=True,
                                                     max_length=spec.max_tokens, return_tensors="np")
    assert max(prepared.tokens) > spec.max_tokens  # some texts were cut
    assert (ids == expected["input_ids"]).all() and (mask == expected["attention_mask"]).all()
    assert prepared.tokens == [len(row) for row in AutoTokenizer.from_pretrained(tiny_a)(
        [prefix + text for text in texts], verbose=False)["input_ids"]]


def test_a_static_model_counts_every_token_and_averages_the_first_max_tokens(static_dir, scifact_texts):
    from model2vec import StaticModel

    spec = spec_for(static_dir, "tiny-static")
    model = StaticModel.from_pretrained(static_dir)
    model.tokenizer.no_truncation()
    texts = ["p53", scifact_texts[14], "Cells divide."]
    every_token = model.tokenize(texts)  # model2vec's own tokenization: no special tokens, no unknown ones
    prepared = providers.load(spec, "cpu").prepare(texts)
    assert prepared.tokens == [len(ids) for ids in every_token]
    assert prepared.tokens[1] > spec.max_tokens  # counted past the limit, embedded up to it
    vectors = providers.load(spec, "cpu").embed(prepared)
    expected = np.stack([model.embedding[ids[:spec.max_tokens]].mean(axis=0) for ids in every_token])
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


def forward_passes(name: str) -> int:
    from segue import metrics

    return int(metrics.REGISTRY.get_sample_value("segue_embed_seconds_count", {"model": name}) or 0)


def test_for_a_while_after_a_read_miss_other_work_is_cut_in_shorter_chunks(minilm_spec):
    spec = dataclasses.replace(minilm_spec, name="minilm-urgent")
    abstracts = [doc.text for doc in scifact_documents(24)]
    engine = EmbeddingEngine(device="cpu", batch_size=256, chunk_seconds=0.8)

    async def passes(priority: int) -> int:
        before = forward_passes(spec.name)
        await engine.embed(spec, abstracts, priority=priority)
        return forward_passes(spec.name) - before

    async def scenario() -> tuple[int, int, int]:
        for _ in range(2):  # load, warm up and time the model on abstracts
            await engine.embed(spec, abstracts[:8], priority=1)
        quiet = await passes(1)
        await engine.embed(spec, ["a reader's query about p53"], priority=0)
        return quiet, await passes(1), await passes(0)

    try:
        quiet, after_a_miss, urgent = asyncio.run(scenario())
    finally:
        engine.close()
    assert after_a_miss >= 2 * quiet, f"a quarter of the chunk time holds a quarter of the abstracts ({quiet}, {after_a_miss})"
    assert urgent < after_a_miss  # urgent work itself keeps whole chunks


def test_chunks_are_budgeted_by_time_so_long_texts_take_more_passes(minilm_spec):
    """Once the engine has timed a model, a chunk holds what it expects to run in ``chunk_seconds``."""
    spec = dataclasses.replace(minilm_spec, name="minilm-chunks")
    abstracts = [doc.text for doc in scifact_documents(24)]
    queries = [f"query {i} about p53" for i in range(24)]
    engine = EmbeddingEngine(device="cpu", batch_size=256, chunk_seconds=0.1)
    try:
        engine.embed_sync(spec, abstracts[:4])  # load, warm up and time a few passes
        before = forward_passes(spec.name)
        budgeted = engine.embed_sync(spec, abstracts)
        passes_for_abstracts = forward_passes(spec.name) - before
        before = forward_passes(spec.name)
        engine.embed_sync(spec, queries)
        passes_for_queries = forward_passes(spec.name) - before
    finally:
        engine.close()
    assert passes_for_abstracts >= 4, "0.1 s holds a few abstracts of MiniLM on a CPU, not 24"
    assert passes_for_queries < passes_for_abstracts
    unbudgeted = EmbeddingEngine(device="cpu", batch_size=256, chunk_seconds=1000)
    try:
        unbudgeted.embed_sync(spec, abstracts[:4])
        before = forward_passes(spec.name)
        whole = unbudgeted.embed_sync(spec, abstracts)
        assert forward_passes(spec.name) - before == 1
    finally:
        unbudgeted.close()
    assert cosine_rows(budgeted, whole).min() >= 0.9999
