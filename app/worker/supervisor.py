"""One host, N workers: ``segue worker --processes N`` runs N Faust workers in the one consumer group.

Each worker is a whole ``segue worker --processes 1`` process (its own consumer, engine
and database connections); Kafka spreads the partitions over them. The supervisor shares
the host out among them (one GPU each, round-robin, where the host has GPUs; an equal share
of the cores for torch and the tokenizers), restarts a worker that dies (that one alone,
after a back-off that grows while it keeps dying young), and serves one operations
endpoint for all of them: ``/metrics`` sums their metrics (prometheus-client's multiprocess
collector over ``PROMETHEUS_MULTIPROC_DIR``), ``/readyz`` is ready when every worker is,
``/healthz`` while the supervisor runs. SIGTERM or SIGINT stops the workers (each finishes
its batch and says ``stopped``) and then the supervisor. A supervisor killed outright (SIGKILL)
leaves its workers running unsupervised; a service manager that stops the whole control group
(systemd, Kubernetes, Docker) stops them with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

log = logging.getLogger("segue.worker.supervisor")

OPS_URL_FILE_ENV = "SEGUE_OPS_URL_FILE"  # where a supervised worker writes its endpoint's URL
POLL_S = 0.5
STOP_TIMEOUT_S = 30.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
YOUNG_S = 60.0  # a worker that dies younger than this is restarted after a longer back-off each time
PROBE_TIMEOUT_S = 5.0


def host_gpus() -> int:
    """CUDA devices this process sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_processes() -> int:
    """One worker per GPU on a GPU host, else one per core this process may use."""
    return host_gpus() or len(os.sched_getaffinity(0))


def write_ops_url(url: str) -> None:
    """Tell the supervisor (if any) where this worker's endpoint listens."""
    path = os.environ.get(OPS_URL_FILE_ENV)
    if path:
        partial = Path(path + ".partial")
        partial.write_text(url)
        partial.replace(path)


@dataclass
class _Worker:
    """One supervised worker process, across its restarts."""

    index: int
    env: dict[str, str]
    url_file: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    restart_at: float | None = None  # when a dead worker is due to start again
    backoff_s: float = FIRST_BACKOFF_S

    def url(self) -> str | None:
        try:
            return self.url_file.read_text().strip() or None
        except FileNotFoundError:
            return None


class Supervisor:
    """Starts, watches and stops the workers; answers the endpoint's questions about them."""

    def __init__(self, processes: int, command: list[str]):
        self.processes = processes
        gpus, cores = host_gpus(), len(os.sched_getaffinity(0))
        self._command = command
        self._dir = Path(tempfile.mkdtemp(prefix="segue-workers-"))
        self._stopping = threading.Event()
        self._beat = time.monotonic()
        urls = [self._dir / f"worker-{index}.url" for index in range(processes)]
        self._workers = [_Worker(index, self._environment(index, url, gpus, cores), url)
                         for index, url in enumerate(urls)]

    def _environment(self, index: int, url_file: Path, gpus: int, cores: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PROMETHEUS_MULTIPROC_DIR=str(self._dir), SEGUE_METRICS_HOST="127.0.0.1", SEGUE_METRICS_PORT="0")
        env[OPS_URL_FILE_ENV] = str(url_file)
        share = str(max(1, cores // self.processes))
        for threads in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS"):  # torch's and the tokenizers' thread pools
            env.setdefault(threads, share)
        if gpus and "SEGUE_DEVICE" not in os.environ:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
            env["CUDA_VISIBLE_DEVICES"] = visible[index % len(visible)]
        return env

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> None:
        """Run the workers until SIGTERM or SIGINT, then stop them."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        try:
            for worker in self._workers:
                self._start(worker)
            while not self._stopping.wait(POLL_S):
                self._beat = time.monotonic()
                for worker in self._workers:
                    self._watch(worker)
        finally:
            self._stop_all()
            shutil.rmtree(self._dir, ignore_errors=True)

    def _start(self, worker: _Worker) -> None:
        worker.url_file.unlink(missing_ok=True)
        # In a session of its own: a terminal's Ctrl-C reaches the supervisor alone, which stops each worker once.
        worker.process = subprocess.Popen(self._command, env=worker.env, start_new_session=True)
        worker.started = time.monotonic()
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _watch(self, worker: _Worker) -> None:
        """Restart ``worker`` if it died and its back-off is over."""
        now = time.monotonic()
        if worker.restart_at is not None:
            if now >= worker.restart_at:
                worker.restarts += 1
                self._start(worker)
            return
        code = worker.process.poll()
        if code is None:
            return
        multiprocess.mark_process_dead(worker.process.pid, str(self._dir))
        lived = now - worker.started
        worker.backoff_s = min(worker.backoff_s * 2, MAX_BACKOFF_S) if lived < YOUNG_S else FIRST_BACKOFF_S
        worker.restart_at = now + worker.backoff_s
        log.warning("worker %d (pid %d) exited with status %d after %.0f s; restarting it in %.0f s",
                    worker.index, worker.process.pid, code, lived, worker.backoff_s)

    def _stop_all(self) -> None:
        running = [w.process for w in self._workers if w.process is not None and w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        log.info("stopped %d worker(s)", len(running))

    # -- the operations endpoint --------------------------------------------------------------

    def metrics(self) -> bytes:
        """Every worker's metrics, combined (counters and histograms summed; gauges by their mode)."""
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self._dir))
        return generate_latest(registry)

    def health(self) -> tuple[bool, dict]:
        alive = not self._stopping.is_set() and time.monotonic() - self._beat < 10 * POLL_S + 5
        running = sum(w.process is not None and w.process.poll() is None for w in self._workers)
        return alive, {"supervisor": "alive" if alive else "stuck", "processes": self.processes, "running": running}

    def readiness(self) -> tuple[bool, dict]:
        with ThreadPoolExecutor(max_workers=self.processes) as pool:
            reports = list(pool.map(self._readiness_of, self._workers))
        ok = all(report["ok"] for report in reports)
        return ok, {"processes": self.processes, "workers": reports}

    def _readiness_of(self, worker: _Worker) -> dict:
        process = worker.process
        report = {"index": worker.index, "pid": process.pid if process else None, "restarts": worker.restarts,
                  "ok": False}
        url = worker.url()
        if process is None or process.poll() is not None or url is None:
            return {**report, "state": "restarting" if worker.restart_at is not None else "starting"}
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=PROBE_TIMEOUT_S) as response:
                detail = json.load(response)
        except urllib.error.HTTPError as error:
            detail = json.load(error)
        except (OSError, ValueError) as error:
            return {**report, "state": f"unreachable ({error})"}
        return {**report, **detail, "ok": bool(detail.get("ok"))}


def supervised_command() -> list[str]:
    """The command line of one supervised worker."""
    return [sys.executable, "-m", "segue.cli", "worker", "--processes", "1"]
