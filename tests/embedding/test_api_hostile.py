"""Provider ``openai`` against a hostile OpenAI-compatible server (``tests/hostileserver.py``), and the response
parser against generated answers: every input ends with its vector or its rejection, nothing else is lost, the
key is never shown, and nothing stalls.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from segue.control import registry
from segue.devtools.modelkit import minilm_path
from segue.embedding import providers
from segue.embedding.engine import EmbeddingEngine
from segue.embedding.providers.api_client import parse_embeddings
from segue.embedding.providers.base import OptionsError
from segue.embedding.providers.openai import CANARY_TEXTS
from segue.errors import ModelHalted, ProviderError
from segue.schemas.events import encode_read_miss
from segue.spec import ModelProfile, ModelSpec
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.harness import Harness, change, harness_env, wait_for
from tests.hostileserver import FAULTS, MARKERS, HostileServer, vector_of

DIM = 32
CLEAN = [f"a clean text about cells and proteins, number {n}" for n in range(12)]
EXPECTED_KINDS = {"[nan]": "non_finite", "[inf]": "non_finite", "[null]": "malformed", "[zero]": "zero",
                  "[narrow]": "wrong_width", "[string]": "malformed", "[refuse]": "refused"}


@pytest.fixture(scope="module")
def server():
    with HostileServer(dim=DIM) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(server):
    server.reset()
    yield


def register(server: HostileServer, version: int, **options) -> ModelSpec:
    """Inspect the hostile server's model as ``segue models add --base-url`` does."""
    options = {"model": server.served_model, "tokenizer": str(minilm_path()), "max_tokens_per_input": 256,
               "timeout_s": 2, "outage_after_s": 30, **options}
    profile = providers.inspect(server.url, provider="openai", options=options)
    return ModelSpec.from_profile(version, f"hostile-{version}", server.url, profile)


def unit(texts: list[str]) -> np.ndarray:
    vectors = np.stack([vector_of(text, DIM) for text in texts])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_each_hostile_item_is_rejected_alone_with_its_reason_and_the_rest_is_exact(server, engine, encoding_format):
    spec = register(server, {"float": 1, "base64": 2}[encoding_format], encoding_format=encoding_format)
    marked = [f"a text about cells {marker}" for marker in MARKERS]
    texts = CLEAN[:4] + marked + [""] + CLEAN[4:8]

    embedded = engine.embed_counted_sync(spec, texts)

    kinds = {i: why.partition(":")[0] for i, why in embedded.rejected.items()}
    assert kinds == {4 + n: EXPECTED_KINDS[marker] for n, marker in enumerate(MARKERS)} | {4 + len(MARKERS): "refused"}
    assert "flagged by the content filter" in embedded.rejected[4 + MARKERS.index("[refuse]")]
    assert "'$.input' is invalid" in embedded.rejected[4 + len(MARKERS)]  # OpenAI refuses an empty input
    good = [i for i in range(len(texts)) if i not in embedded.rejected]
    np.testing.assert_allclose(embedded.vectors[good], unit([texts[i] for i in good]), atol=1e-6)
    assert not embedded.vectors[list(embedded.rejected)].any()


def test_answers_broken_as_a_whole_are_retried_and_every_text_ends_with_its_vector(server, engine, tokenizer,
                                                                                    caplog):
    spec = register(server, 3, max_inputs_per_request=4)
    server.clear()  # the registration's canaries are billed to the command that registers
    tokens = 0
    with caplog.at_level(logging.WARNING, logger="segue.embedding.providers.api"):
        for n, fault in enumerate(FAULTS):
            server.inject(fault)
            texts = [f"{text} ({n})" for text in CLEAN[:4]]
            embedded = engine.embed_counted_sync(spec, texts)
            assert embedded.rejected == {}, fault
            np.testing.assert_allclose(embedded.vectors, unit(texts), atol=1e-6)
            tokens += sum(embedded.tokens)

    assert {a.fault for a in server.answered()} == set(FAULTS) | {None}
    for logged in ("malformed: a 200 response whose indexes (0, 0, 2, 3) are not 0…3", "are not 0…3, each once",
                   "malformed: a response of over", "timeout: no whole response within 2s",
                   "rate_limited: HTTP 429"):
        assert logged in caplog.text
    # Every answered request is billed, the broken and the retried ones with the rest (canaries included).
    answered = [text for a in server.answered() if a.status == 200 for text in a.texts]
    assert engine.billed_tokens()[3] == sum(len(e.ids) for e in tokenizer.encode_batch(answered))
    assert engine.billed_tokens()[3] > tokens


def test_a_request_too_big_for_the_endpoint_is_halved_and_later_requests_stay_small(server, engine, caplog):
    spec = register(server, 4, max_inputs_per_request=12)
    server.max_inputs = 5  # nginx in front of the model answers larger requests with an HTML 413 page

    with caplog.at_level(logging.WARNING, logger="segue.embedding.providers.api"):
        first = engine.embed_counted_sync(spec, CLEAN)
    server.clear()
    second = engine.embed_counted_sync(spec, [text.upper() for text in CLEAN])

    assert first.rejected == {} and second.rejected == {}
    np.testing.assert_allclose(first.vectors, unit(CLEAN), atol=1e-6)
    # The first request (the 8 canary texts) is refused and its halves of 4 taken: 4 it is from then on.
    assert "refused a request of 8 inputs (HTTP 413: 413 Request Entity Too Large" in caplog.text
    assert "requests now carry at most 4 inputs" in caplog.text and "<html>" not in caplog.text
    assert [len(a.texts) for a in server.answered()] == [4, 4, 4] and {a.status for a in server.answered()} == {200}


def test_an_endpoint_that_refuses_everything_halts_the_model_after_one_probe(server, caplog):
    spec = register(server, 5)
    server.clear()
    server.refuse_everything = True
    engine = EmbeddingEngine(device="cpu")
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(ModelHalted, match="refuses every request, even the one-text request"):
            engine.embed_counted_sync(spec, CLEAN[:3])
        assert len(server.answered()) == 2  # the canary check, then the probe: no split into single inputs
        with pytest.raises(ModelHalted):
            engine.embed_counted_sync(spec, CLEAN[3:6])
        assert len(server.answered()) == 2  # a halted model sends nothing
        assert "hostile-5" in engine.halted() and "restart the worker" in engine.halted()["hostile-5"]
    finally:
        engine.close()


def test_a_key_echoed_by_a_refusing_endpoint_is_never_shown(server, monkeypatch, caplog):
    monkeypatch.setenv("SEGUE_TEST_HOSTILE_KEY", "sk-right-key-for-the-hostile-server")
    server.expected_key = "sk-right-key-for-the-hostile-server"
    spec = register(server, 6, api_key_env="SEGUE_TEST_HOSTILE_KEY")
    server.clear()
    monkeypatch.setenv("SEGUE_TEST_HOSTILE_KEY", "sk-wrong-secret-4242abcd")
    engine = EmbeddingEngine(device="cpu")
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(ModelHalted) as halted:
            engine.embed_counted_sync(spec, CLEAN[:2])
        assert [a.fault for a in server.answered()] == ["unauthorized"]  # echoed the key back, not retried
        shown = caplog.text + str(halted.value) + str(engine.halted()) + str(spec.config)
        assert "4242abcd" not in shown and "sk-right-key" not in shown
        assert "Incorrect API key provided: ***." in str(halted.value)
    finally:
        engine.close()


def test_a_canary_answered_with_nan_halts_the_model(server):
    spec = register(server, 7, canary_every_s=0.2)
    engine = EmbeddingEngine(device="cpu")
    try:
        assert engine.embed_counted_sync(spec, CLEAN[:2]).rejected == {}  # canaries checked and as recorded
        server.nan_texts = {CANARY_TEXTS[1]}
        time.sleep(0.3)
        with pytest.raises(ModelHalted, match="canary texts changed"):
            engine.embed_counted_sync(spec, CLEAN[2:4])
        assert not any(CLEAN[2] in a.texts for a in server.answered())  # nothing sent after the failed check
    finally:
        engine.close()


def test_binding_an_adopted_model_to_an_endpoint_that_answers_nan_is_refused(server, engine, tmp_path_factory):
    texts = ["an adopted text about cells", "another adopted text about proteins"]
    h = Harness(tmp_path_factory.mktemp("bind"))
    try:
        with connections.connect(h.settings, h.database_url) as conn:
            profile = ModelProfile(provider=providers.ADOPTED, dim=DIM, max_tokens=0, config={"source": "test"},
                                   fingerprint="0" * 64)
            adopted = registry.register_model(conn, "adopted", "test", profile=profile)
            for n, text in enumerate(texts):
                sha = hashlib.sha256(text.encode()).digest()
                conn.execute(sql.SQL("INSERT INTO documents (doc_id, body, version, content_sha256, {v}, {h})"
                                     " VALUES (%s, %s, 1, %s, %s, %s)").format(
                    v=model_columns.vector_column(adopted.version), h=model_columns.sha_column(adopted.version)),
                    (f"doc-{n}", text, sha, unit([text])[0], sha))
            options = {"model": server.served_model, "tokenizer": str(minilm_path()), "max_tokens_per_input": 256}
            server.nan_texts = {texts[1]}
            with pytest.raises(registry.RegistryError, match="gives no usable vector for one of 2 documents"):
                registry.bind_model(conn, engine, "adopted", server.url, provider="openai", options=options)
            assert registry.get_model(conn, "adopted").spec.provider == providers.ADOPTED  # nothing changed
            server.nan_texts = set()
            bound, cosine = registry.bind_model(conn, engine, "adopted", server.url, provider="openai",
                                                options=options)
            assert bound.provider == "openai" and cosine >= 0.999
    finally:
        h.close()


def test_credentials_in_the_base_url_are_refused_before_any_request(server):
    with_credentials = server.url.replace("http://", "http://user:secret-password@")
    with pytest.raises(OptionsError, match="carries credentials"):
        providers.inspect(with_credentials, provider="openai", options={"model": "hostile",
                                                                        "tokenizer": str(minilm_path())})
    with pytest.raises(OptionsError, match="not an http"):
        providers.inspect("ftp://example.org/v1", provider="openai", options={"model": "hostile",
                                                                              "tokenizer": str(minilm_path())})
    assert server.answered() == []


# -- the response parser, on generated answers ------------------------------------------------------------------

NUMBERS = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.integers(-10**400, 10**400),
                    st.none(), st.booleans(), st.text(max_size=3))
EMBEDDINGS = st.one_of(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=3, max_size=5),  # good, or of another width
    st.lists(NUMBERS, min_size=1, max_size=5),
    st.binary(max_size=24).map(lambda raw: base64.b64encode(raw).decode()),
    st.none(), st.text(max_size=5), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
INDEXES = st.one_of(st.integers(-2, 6), st.none(), st.text(max_size=2), st.booleans(), st.floats(0, 3))


@st.composite
def answers(draw) -> tuple[dict, int]:
    """An embeddings answer for ``count`` inputs: mostly well formed, with hostile items and indexes mixed in."""
    count = draw(st.integers(1, 5))
    order = draw(st.permutations(range(count)))
    items = [{"index": i, "embedding": draw(EMBEDDINGS)} for i in order]
    if draw(st.booleans()):
        for item in draw(st.lists(st.sampled_from(items), max_size=2)):
            item["index"] = draw(INDEXES)
    if draw(st.booleans()):
        items = draw(st.lists(st.sampled_from(items), max_size=count + 1)) if items else items
    return {"data": items}, count


def parsed(embedding) -> np.ndarray | None:
    """One item's numbers as float32 (any width, finite or not), or None when they are not numbers at all."""
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except ValueError:
            return None
        return np.frombuffer(raw, dtype="<f4") if raw and not len(raw) % 4 else None
    if not isinstance(embedding, list) or not embedding or not all(type(x) in (int, float) for x in embedding):
        return None
    try:
        floats = [float(x) for x in embedding]
    except OverflowError:  # an integer no float holds
        return None
    with np.errstate(over="ignore"):
        return np.asarray(floats, dtype=np.float64).astype(np.float32)


def expected_outcome(embedding, width: int) -> np.ndarray | str:
    """What the parser must make of one item: its vector, or the kind of its rejection."""
    vector = parsed(embedding)
    if vector is None:
        return "malformed"
    if len(vector) != width:
        return "wrong_width"
    return vector if np.isfinite(vector).all() else "non_finite"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers(), st.sampled_from([3, 4]))
def test_a_parsed_answer_is_exact_for_each_input_or_says_why(answer, dim):
    body, count = answer
    # What goes over the wire: JSON (NaN and Infinity as bare literals, as Python's json writes them).
    body = json.loads(json.dumps(body))
    indexes = [item["index"] for item in body["data"]]
    try:
        vectors, rejected, widths = parse_embeddings(body, count, dim)
    except ProviderError as error:
        assert error.kind == "malformed"
        assert not (all(type(i) is int for i in indexes) and sorted(indexes) == list(range(count)))
        return
    assert all(type(i) is int for i in indexes) and sorted(indexes) == list(range(count))
    assert len(vectors) == count
    assert sorted(widths.elements()) == sorted(len(v) for item in body["data"]
                                               if (v := parsed(item["embedding"])) is not None)
    for item in body["data"]:
        outcome = expected_outcome(item["embedding"], dim)
        i = item["index"]
        if isinstance(outcome, str):
            assert vectors[i] is None and rejected[i].startswith(outcome + ":")
        else:
            assert i not in rejected and np.array_equal(vectors[i], outcome, equal_nan=False)
            assert math.isfinite(float(np.abs(vectors[i]).sum()))


# -- a worker in front of it ------------------------------------------------------------------------------------

def current(h: Harness, version: int, doc_ids: list[str]) -> int:
    return h.scalar(f"SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND embedding_v{version}_sha256"
                    " = content_sha256", (doc_ids,))


@pytest.mark.drill
def test_a_worker_keeps_every_other_models_writes_flowing_through_a_hostile_api(tmp_path, model_cache):
    """A static model and an API model: hostile items fail alone and are dead-lettered, broken answers are retried,
    a request too big is halved, read misses do not stall, a replay fills the missing vectors, and a key echoed
    back by the endpoint is shown nowhere."""
    key = "sk-hostile-right-key-0123456789"
    env = harness_env(tmp_path) | {"HOSTILE_KEY": key, "SEGUE_HEARTBEAT_INTERVAL_S": "1",
                                   "SEGUE_SWEEPER_INTERVAL_S": "3600"}
    with HostileServer(dim=DIM) as server:
        server.expected_key = key
        h = Harness(tmp_path, env)
        try:
            h.segue("models", "add", "old", "--source", str(modelfactory.tiny_static(model_cache)))
            h.segue("models", "add", "api", "--base-url", server.url, "--model", server.served_model,
                    "--api-key-env", "HOSTILE_KEY", "--option", f"tokenizer={minilm_path()}",
                    "--option", "max_tokens_per_input=256", "--option", "timeout_s=2", "--option", "outage_after_s=20")
            worker = h.start_worker()
            h.wait_ready(worker)
            server.max_inputs = 6  # nginx in front of it: larger requests get an HTML 413
            for fault in FAULTS:
                server.inject(fault)
            clean = {f"clean-{n}": f"a clean abstract about cells and proteins, number {n}" for n in range(24)}
            marked = {f"marked-{n}": f"a marked abstract about cells {marker}" for n, marker in enumerate(MARKERS)}
            h.publish_changes([(doc_id, change(doc_id, text, 1)) for doc_id, text in (clean | marked).items()])

            everything = list(clean | marked)
            wait_for(lambda: current(h, 1, everything) == len(everything), timeout=120,
                     what="the static model's vectors of every document")
            wait_for(lambda: current(h, 2, list(clean)) == len(clean), timeout=120, what="the API's clean vectors")
            failed = dict(h.sql("SELECT doc_id, error FROM migration_changelog WHERE model_version = 2"
                                " AND action = 'failed'"))
            assert set(failed) == set(marked) and current(h, 2, list(marked)) == 0
            for n, marker in enumerate(MARKERS):
                assert failed[f"marked-{n}"].startswith(f"input_rejected: {EXPECTED_KINDS[marker]}:")
            letters = wait_for(lambda: [d for d in h.dead_letters() if d["reason"] == "input_rejected"]
                               if len(h.dead_letters()) >= len(marked) else None, what="the dead letters")
            assert sorted(d["key"] for d in letters) == sorted(marked)
            assert all(d["error"].startswith("model 'api': ") for d in letters)

            # A read miss for a rejected text fails alone; the one behind it goes through.
            h.publish_read_misses([("marked-0", encode_read_miss("marked-0", "api")),
                                   ("clean-0", encode_read_miss("clean-0", "api"))])
            misses = "SELECT doc_id, action FROM migration_changelog WHERE origin = 'read_miss' ORDER BY id"
            wait_for(lambda: len(h.sql(misses)) == 3, what="both read misses")
            assert sorted(h.sql(misses)) == [("clean-0", "unchanged"), ("marked-0", "dead_lettered"),
                                             ("marked-0", "failed")]

            # Once the endpoint answers them, a replay of the letters fills in the missing vectors only.
            server.markers_active = False
            h.segue("dlq", "replay", "--reason", "input_rejected")
            wait_for(lambda: current(h, 2, list(marked)) == len(marked), timeout=60, what="the replayed changes")
            assert h.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = ANY(%s) AND model_version = 1"
                            " AND action = 'embedded'", (list(marked),)) == len(marked)  # not embedded again

            assert "requests now carry at most" in h.worker_log(worker)
            assert {a.fault for a in server.answered()} >= set(FAULTS) | {"html_413"}
            billed, embedded = wait_for(lambda: (row := h.sql("SELECT billed_tokens, embedded_tokens FROM model_spend"
                                                              " WHERE model = 'api'")[0])[0] > row[1] and row,
                                        what="the billed tokens recorded")
            assert billed > embedded > 0

            # The endpoint refuses the key and echoes it back: the model halts, the key is shown nowhere.
            server.expected_key = "sk-another-key"
            h.publish_changes([("after-401", change("after-401", "written after the key was refused", 1))])
            wait_for(lambda: current(h, 1, ["after-401"]) == 1, what="the static model's write after the 401")
            wait_for(lambda: h.scalar("SELECT count(*) FROM workers WHERE halted ? 'api'") == 1, what="the halt")
            stored = h.sql("SELECT error FROM migration_changelog WHERE error IS NOT NULL")
            assert key not in h.worker_log(worker) + str(stored) + h.segue("status").stdout
        finally:
            h.close()
