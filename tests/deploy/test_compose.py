"""docker-compose.yml parses and wires the worker with variables the settings accept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from segue.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_runs_kafka_pgvector_and_a_worker():
    services = load("docker-compose.yml")["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["postgres"]["image"].startswith("pgvector/pgvector:")
    assert services["worker"]["command"] == ["segue", "worker"]
    assert set(services["worker"]["depends_on"]) == {"kafka", "postgres"}


def test_worker_environment_is_accepted_by_settings(monkeypatch):
    env = load("docker-compose.yml")["services"]["worker"]["environment"]
    fields = {f"SEGUE_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("SEGUE_")} - fields
    assert not unknown, f"compose sets variables Settings does not read: {unknown}"
    for key in list(os.environ):
        if key.startswith("SEGUE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.faust_broker == "kafka://kafka:9092"
    assert settings.database_url == "postgresql://segue:segue@postgres:5432/segue"
    assert settings.topic_partitions == int(env["SEGUE_TOPIC_PARTITIONS"])


@pytest.mark.parametrize("bad", [{"SEGUE_TOPIC_PARTITIONS": "0"}, {"SEGUE_BATCH_SIZE": "lots"}])
def test_settings_reject_bad_values(monkeypatch, bad):
    for key, value in bad.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError):
        Settings()


def test_gpu_override_reserves_one_gpu_per_worker():
    devices = load("docker-compose.gpu.yml")["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    worker_env = load("docker-compose.yml")["services"]["worker"]["environment"]
    assert "SEGUE_BATCH_SIZE" not in worker_env  # a worker sizes its batches by its device: 512 on a GPU, 64 on a CPU


def test_settings_refuse_an_hnsw_graph_pgvector_cannot_build(monkeypatch):
    monkeypatch.setenv("SEGUE_HNSW_M", "16")
    monkeypatch.setenv("SEGUE_HNSW_EF_CONSTRUCTION", "24")
    with pytest.raises(ValueError, match="at least twice SEGUE_HNSW_M"):
        Settings()


def test_compose_postgres_has_room_for_parallel_index_builds():
    postgres = load("docker-compose.yml")["services"]["postgres"]
    assert postgres["shm_size"] == "1g"  # parallel HNSW builds use /dev/shm; Docker's default is 64 MB


def test_compose_scrapes_workers_and_checks_their_readiness():
    services = load("docker-compose.yml")["services"]
    port = Settings.model_fields["metrics_port"].default
    worker = services["worker"]
    assert worker["environment"]["SEGUE_METRICS_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0] == {"names": ["worker"], "type": "A", "port": port}
    mounted = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    assert "deploy/prometheus/prometheus.yml" in mounted and "deploy/grafana/dashboards" in mounted
