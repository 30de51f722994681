"""A migration from a local static model to an API-served MiniLM, end to end through the CLI and a worker.

The API is infinity-emb (real, offline) behind our fault-injecting proxy. The test drives
``segue models add --base-url``, ``migrate plan`` (token price, batch price, truncation
warning), ``migrate start``, ``backfill --max-usd`` then ``backfill`` through injected
faults, an outage (the static model's writes go on; the API model catches up after), the
cutover, and a model swapped behind the API's name (canaries: the worker stops writing it).
"""

from __future__ import annotations

import re
import time

import pytest
from model2vec import StaticModel
from tokenizers import Tokenizer

from segue.devtools.corpus import scifact_documents
from segue.devtools.modelkit import minilm_path
from tests import modelfactory
from tests.apiserver import FaultProxy
from tests.harness import Harness, change, harness_env, wait_for

pytestmark = pytest.mark.drill

PRICE = 1000.0  # USD per 1M tokens: high, so a small corpus shows a dollar budget at work
FAULTS = {"rate_limited": {"retry_after": 1}, "unavailable": {"retry_after": 1}, "server_error": {},
          "slow": {"delay_s": 8}, "malformed": {}, "wrong_dimension": {}}
# One outage per kind of failure the worker waits out (an error answer, a rate limit, no answer in time); each
# error class's own handling is test_api_provider's, every class's logging is the fault phase's below.
OUTAGES = [("server_error", {}, "server_error"), ("rate_limited", {"retry_after": 1}, "rate_limited"),
           ("slow", {"delay_s": 8}, "timeout")]
LOGGED_CLASSES = ("rate_limited: HTTP 429", "server_error: HTTP 503", "server_error: HTTP 500",
                  "timeout: no whole response within 5s", "malformed: a 200 response", "wrong_dimension: 383-d")


def current(h: Harness, model_version: int, doc_ids: list[str]) -> int:
    return h.scalar(f"SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND embedding_v{model_version}_sha256"
                    " = content_sha256", (doc_ids,))


def coverage(h: Harness, model: str) -> float:
    return float(h.scalar("SELECT coverage_pct FROM migration_progress WHERE model = %s", (model,)) or 0)


def test_a_migration_to_an_api_model_through_faults_an_outage_and_a_swapped_model(infinity, tmp_path, model_cache):
    proxy = FaultProxy(infinity.url).start()
    env = harness_env(tmp_path) | {"SEGUE_SWEEPER_INTERVAL_S": "1", "SEGUE_SWEEPER_MAX_AGE_S": "1",
                                   "SEGUE_SWEEPER_RETRY_FAILED_AFTER_S": "2", "SEGUE_HEARTBEAT_INTERVAL_S": "1"}
    h = Harness(tmp_path, env)
    try:
        documents = [d for d in scifact_documents(80) if len(d.text.encode()) < 3500][:40]
        doc_ids = [f"sf-{n}" for n in range(len(documents))]
        h.segue("models", "add", "old", "--source", str(modelfactory.tiny_static(model_cache)))
        worker = h.start_worker()
        h.wait_ready(worker)
        h.publish_changes([(i, change(i, d.text, 1)) for i, d in zip(doc_ids, documents)])
        wait_for(lambda: current(h, 1, doc_ids) == len(doc_ids), timeout=120, what="the corpus on the old model")

        h.segue("models", "add", "api", "--base-url", proxy.url, "--model", "minilm",
                "--option", f"tokenizer={minilm_path()}", "--option", "max_tokens_per_input=256",
                "--option", f"price_per_million_tokens={PRICE}",
                "--option", f"batch_price_per_million_tokens={PRICE / 2}",
                "--option", "max_inputs_per_request=8", "--option", "timeout_s=5", "--option", "outage_after_s=4",
                "--option", "canary_every_s=2")
        plan = h.segue("migrate", "plan", "--to", "api", "--sample", "16").stdout
        assert "per 1M tokens (synchronous API)" in plan and "with the provider's batch API" in plan
        assert "truncates more of the sample than old" in plan
        assert "migration 1 started: old → api" in h.segue("migrate", "start", "--to", "api").stdout

        budgeted = h.segue("backfill", "--max-usd", "1").stdout
        assert "stopped at the budget" in budgeted
        published = int(re.search(r"published (\d+) documents", budgeted).group(1))
        tokens = int(re.search(r"([\d,]+) tokens spent", budgeted).group(1).replace(",", ""))
        assert 0 < published < len(doc_ids) and tokens <= 1_000_000 / PRICE

        for kind, params in FAULTS.items():
            proxy.inject(kind, **params)
        assert "backfill complete" in h.segue("backfill").stdout
        wait_for(lambda: coverage(h, "api") == 100.0, timeout=240, what="the backfill through the faults")
        assert {r.fault for r in proxy.records() if r.fault} == set(FAULTS)
        for logged in LOGGED_CLASSES:
            assert logged in h.worker_log(worker)

        # Tokens and the truncation ledger, in SQL.
        tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
        tokenizer.no_truncation()
        long_docs = sum(len(e.ids) > 256 for e in tokenizer.encode_batch([d.text for d in documents]))
        assert long_docs > 0
        assert h.scalar("SELECT truncated_documents FROM migration_progress WHERE model = 'api'") == long_docs
        static = StaticModel.from_pretrained(modelfactory.tiny_static(model_cache))
        static.tokenizer.no_truncation()
        cut_by_old = sum(len(ids) > static.max_length for ids in static.tokenize([d.text for d in documents]))
        assert h.scalar("SELECT truncated_documents FROM migration_progress WHERE model = 'old'") == cut_by_old
        # Spend counts every request the API answered (canaries, and the malformed and wrong-width answers retried),
        # recorded by the worker's heartbeat; the embedded rows count what the vectors were made from.
        spend = "SELECT tokens, usd, embedded_tokens, billed_tokens FROM model_spend WHERE model = 'api'"
        spent, usd, embedded, billed = wait_for(lambda: (row := h.sql(spend)[0])[3] > row[2] and row,
                                                what="the billed tokens recorded")
        assert embedded == h.scalar("SELECT sum(tokens_used) FROM migration_changelog WHERE model_version = 2"
                                    " AND action = 'embedded'") > 0
        assert spent == billed
        assert float(usd) == pytest.approx(spent * PRICE / 1e6)
        assert h.scalar("SELECT count(*) FROM migration_changelog WHERE model_version = 2 AND action = 'embedded'"
                        " AND (tokens_used IS NULL OR tokens_total < tokens_used)") == 0

        # Outages of each class: changes keep their old-model vectors within the outage deadline, the API
        # model's failed rows name the class, and its vectors catch up once the API is back.
        for kind, params, error_class in OUTAGES:
            proxy.inject(kind, times=100_000, **params)
            outage = [f"{kind}-{n}" for n in range(3)]
            started = time.monotonic()
            h.publish_changes([(i, change(i, f"written while the API fails with {kind}, number {i}", 1))
                               for i in outage])
            wait_for(lambda: current(h, 1, outage) == len(outage), timeout=60, what=f"old-model writes ({kind})")
            assert time.monotonic() - started < 30
            assert current(h, 2, outage) == 0
            assert h.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = ANY(%s) AND model_version = 2"
                            " AND action = 'failed' AND error LIKE %s",
                            (outage, f"provider_unavailable: ProviderError: {error_class}:%")) == len(outage)
            proxy.reset()
            wait_for(lambda: current(h, 2, outage) == len(outage), timeout=120, what=f"the API back ({kind})")

        assert "reads now use api" in h.segue("migrate", "cutover", "--force", "--reason", "test: no labels").stdout

        # The provider swaps the model behind the name: the canaries catch it, writes to it stop.
        proxy.rewrite_model({"minilm": "minilm-cls"})
        time.sleep(2.5)  # canary_every_s=2: the next request checks them again
        h.publish_changes([("after-swap", change("after-swap", "a change after the provider swapped models", 1))])
        wait_for(lambda: current(h, 1, ["after-swap"]) == 1, timeout=60, what="the old model's write after the swap")
        wait_for(lambda: h.scalar("SELECT count(*) FROM workers WHERE halted ? 'api'") == 1, timeout=30,
                 what="the worker to report the halted model")
        assert current(h, 2, ["after-swap"]) == 0
        (error,) = h.sql("SELECT error FROM migration_changelog WHERE doc_id = 'after-swap' AND model_version = 2")[0]
        assert "canary texts changed" in error and "segue migrate start" in error
        assert "halted" in h.segue("status").stdout
        assert not any("a change after the provider swapped models" in r.texts for r in proxy.records())
        assert h.dead_letters() == []
    finally:
        proxy.close()
        h.close()
