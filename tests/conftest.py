"""Session fixtures: tiny real models, embedded services with both models registered, a worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    from segue import db, registry

    h = Harness(tmp_path_factory.mktemp("segue"))
    with db.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, OLD, str(modelfactory.tiny_static(model_cache)))
        registry.register_model(conn, NEW, str(modelfactory.tiny_transformer_a(model_cache)))
    yield h
    h.close()


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
    from segue.modelkit import minilm_path
    from tests.apiserver import InfinityServer, cls_pooled_copy

    folder = tmp_path_factory.mktemp("served")
    with InfinityServer({"minilm": minilm_path(), "minilm-cls": cls_pooled_copy(minilm_path(), folder / "minilm-cls")},
                        log_dir=folder) as server:
        yield server
