"""Session fixtures: tiny real models, embedded services with both models registered, a worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers inherit COLUMNS=80/LINES=24 from execnet; the CLI processes the tests run must
# lay out their tables as they do in any pipe, however the suite is run.
for name in ("COLUMNS", "LINES"):
    os.environ.pop(name, None)
# A suite started in the background by a shell without job control (`pytest &` in a script) inherits SIGINT
# ignored, and so would every CLI process it starts: the Ctrl-C tests would find their commands deaf to it. A
# handler (unlike "ignored") is reset to the default in the children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tests import modelfactory  # noqa: E402
from tests.harness import Harness  # noqa: E402

OLD = "old-static"
NEW = "new-tiny"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def harness(tmp_path_factory, model_cache) -> Harness:
    """Embedded PostgreSQL and broker with an old (static) and a new (transformer) model registered."""
    from segue.control import registry
    from segue.storage import connections

    h = Harness(tmp_path_factory.mktemp("segue"))
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, OLD, str(modelfactory.tiny_static(model_cache)))
        registry.register_model(conn, NEW, str(modelfactory.tiny_transformer_a(model_cache)))
    yield h
    h.close()


@pytest.fixture(scope="module")
def engine():
    """An embedding engine on the CPU for one test module (model versions are per module: they would clash)."""
    from segue.embedding.engine import EmbeddingEngine

    engine = EmbeddingEngine(device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's tokenizer, neither truncating nor padding: the tokens an API model is sent."""
    from tokenizers import Tokenizer

    from segue.devtools.modelkit import minilm_path

    tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@pytest.fixture(scope="session")
def worker(harness):
    """A worker subprocess shared by the tests; tests that kill it start a replacement."""
    process = harness.start_worker()
    harness.wait_ready(process)
    return process


@pytest.fixture(scope="session")
def infinity(tmp_path_factory):
    """A real OpenAI-compatible server (infinity-emb, in its own virtualenv) serving the bundled MiniLM as
    ``minilm``, and a CLS-pooled copy of it (another model of the same width) as ``minilm-cls``."""
    from segue.devtools.modelkit import minilm_path
    from tests.apiserver import InfinityServer, cls_pooled_copy

    folder = tmp_path_factory.mktemp("served")
    with InfinityServer({"minilm": minilm_path(), "minilm-cls": cls_pooled_copy(minilm_path(), folder / "minilm-cls")},
                        log_dir=folder) as server:
        yield server
