"""What a worker measures, as Prometheus metrics (prometheus-client).

Names follow Prometheus conventions (``segue_…_total`` counters, base units:
seconds, records, a 0–1 ratio); the help text names the OpenTelemetry semantic
convention a metric corresponds to where one exists. Every metric lives in
:data:`REGISTRY`, which the worker's ``/metrics`` endpoint serves. Under a supervisor
(``segue worker --processes N``) each worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` and the supervisor serves their sum; each gauge says how
its workers' values combine (``multiprocess_mode``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from segue.schemas.events import DeadLetterReason

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

EVENTS = Counter(
    "segue_events", "Records consumed, by topic and outcome (embedded, unchanged, superseded, deleted, "
    "dead_lettered with its reason, failed); OpenTelemetry: messaging.client.consumed.messages.",
    ["topic", "outcome", "reason"], registry=REGISTRY)
RETRIES = Counter(
    "segue_batch_retries", "Batch retries, by topic and kind (transient: the infrastructure failed; "
    "failure: the batch failed and may be split).", ["topic", "kind"], registry=REGISTRY)
DEAD_LETTERS = Counter(
    "segue_dead_letters_produced", "Records published to the dead-letter topic, by source topic and reason.",
    ["topic", "reason"], registry=REGISTRY)
FRESHNESS = Histogram(
    "segue_freshness_seconds", "From publication of a record to the commit of its outcome, by origin "
    "(change, read_miss, backfill).", ["origin"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram(
    "segue_batch_records", "Records in a batch taken from a topic; OpenTelemetry: messaging.batch.message_count.",
    ["topic"], buckets=BATCH_BUCKETS, registry=REGISTRY)
BATCH_SECONDS = Histogram(
    "segue_batch_seconds", "Time to process a batch to its commit, retries included; "
    "OpenTelemetry: messaging.process.duration.", ["topic"], buckets=LATENCY_BUCKETS, registry=REGISTRY)

VECTORS_WRITTEN = Counter(
    "segue_vectors_written", "Vectors committed to a model's column.", ["model"], registry=REGISTRY)
EMBED_SECONDS = Histogram(
    "segue_embed_seconds", "Time of one forward pass (a chunk of texts) of a model.", ["model"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY)
CHUNKS = Counter(
    "segue_chunks", "Chunks of a chunked model's documents: embedded, or reused (the same text embedded before).",
    ["model", "outcome"], registry=REGISTRY)
TEXTS_EMBEDDED = Counter("segue_texts_embedded", "Texts embedded by a model.", ["model"], registry=REGISTRY)
TOKENS_EMBEDDED = Counter(
    "segue_tokens_embedded", "Input tokens embedded by a model, after truncation; "
    "OpenTelemetry: gen_ai.client.token.usage (input).", ["model"], registry=REGISTRY)
TRUNCATED_TEXTS = Counter(
    "segue_truncated_texts", "Texts over a model's input limit, embedded truncated.", ["model"], registry=REGISTRY)
ENGINE_QUEUE = Gauge(
    "segue_engine_queue_chunks", "Chunks waiting in the embedding engine, by priority "
    "(read_miss, change, backfill).", ["priority"], multiprocess_mode="livesum", registry=REGISTRY)
ENGINE_WAIT_SECONDS = Histogram(
    "segue_engine_wait_seconds", "Time a chunk waited in the embedding engine before its forward pass, by priority "
    "(read_miss, change, backfill).", ["priority"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
MODEL_READY = Gauge(
    "segue_model_ready", "1 when a live model is loaded and warm in this worker (in every worker, under a supervisor).",
    ["model"], multiprocess_mode="livemin", registry=REGISTRY)
MODEL_HALTED = Gauge(
    "segue_model_halted", "1 while this worker has stopped writing a model until an operator acts, by reason "
    "(auth: the API key was refused; rejected: the endpoint refuses every request; canary_drift: the provider "
    "changed the model behind the name).", ["model", "reason"], multiprocess_mode="livemax", registry=REGISTRY)
TEXTS_REJECTED = Counter(
    "segue_texts_rejected", "Texts a model gave no usable vector, by model and reason (refused or too_long by its "
    "endpoint, malformed, wrong_width, non_finite, zero); each is dead-lettered as input_rejected.",
    ["model", "reason"], registry=REGISTRY)
PROVIDER_REQUESTS = Counter(
    "segue_provider_requests", "Requests to an embedding API, by model and outcome (ok, or the error class).",
    ["model", "outcome"], registry=REGISTRY)
PROVIDER_SECONDS = Histogram(
    "segue_provider_request_seconds", "Time of one embedding API request, to its response; "
    "OpenTelemetry: gen_ai.client.operation.duration.", ["model"], buckets=LATENCY_BUCKETS, registry=REGISTRY)

LAG_RECORDS = Gauge(
    "segue_consumer_lag_records", "Records on a partition not processed yet (broker high watermark - next offset); "
    "OpenTelemetry: messaging.kafka.consumer.lag.", ["topic", "partition"], multiprocess_mode="livemax",
    registry=REGISTRY)
LAG_SECONDS = Gauge(
    "segue_consumer_lag_seconds", "How far behind a partition is in time: 0 when caught up, else the age of the "
    "last record processed (an upper bound on the oldest waiting record's age).", ["topic", "partition"],
    multiprocess_mode="livemax", registry=REGISTRY)

DB_TRANSACTION_SECONDS = Histogram(
    "segue_db_transaction_seconds", "Time of a write transaction, to its commit; "
    "OpenTelemetry: db.client.operation.duration.", buckets=LATENCY_BUCKETS, registry=REGISTRY)
DB_ERRORS = Counter(
    "segue_db_errors", "Database errors that were retried, by kind (connection, lock, other).", ["kind"],
    registry=REGISTRY)

MIGRATION_STATE = Gauge(
    "segue_migration_state", "1 for the state the active migration is in (none when there is none).", ["state"],
    multiprocess_mode="livemax", registry=REGISTRY)
COVERAGE = Gauge(
    "segue_coverage_ratio", "Share of documents whose vector for a live model is current (from the counters).",
    ["model"], multiprocess_mode="livemax", registry=REGISTRY)

PRIORITY_NAMES = {0: "read_miss", 1: "change", 2: "backfill"}
MIGRATION_STATES = ("none", "running", "paused", "ready", "cut_over", "rolled_back")


def count_outcome(origin: str, topic: str, outcome: str, latency_ms: float | None, reason: str = "") -> None:
    """One record's committed outcome: the events counter and, when its publication time is known, freshness."""
    EVENTS.labels(topic, outcome, reason).inc()
    if latency_ms is not None:
        FRESHNESS.labels(origin).observe(max(latency_ms, 0.0) / 1000)


def initialize(topics: list[str]) -> None:
    """Create the labelled series whose values are known in advance, at 0, so dashboards and alerts see them
    before the first failure does."""
    for topic in topics:
        for kind in ("transient", "failure"):
            RETRIES.labels(topic, kind)
        for reason in DeadLetterReason:
            DEAD_LETTERS.labels(topic, reason.value)
    for kind in ("connection", "lock", "other"):
        DB_ERRORS.labels(kind)
