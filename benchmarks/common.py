"""What the end-to-end benchmarks share: production batch settings and the static models they distil once."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.harness runs the services and workers

from segue.devtools.modelkit import distill_static, minilm_path  # noqa: E402
from segue.devtools.services import service_pids  # noqa: E402
from tests.harness import Harness, wait_for  # noqa: E402

TEXT_CHARS = 3000  # abstracts are cut under the harness's 4,000-byte limit on a text
_TEST_SIZED = ("SEGUE_BATCH_SIZE", "SEGUE_BATCH_TIMEOUT_S", "TOKENIZERS_PARALLELISM")  # the harness's test settings
_MODELS = Path(tempfile.gettempdir()) / "segue-bench-models"


def production_env(h: Harness) -> dict[str, str]:
    """The harness's worker environment with Segue's default change batch size and window, tokenizers on every core."""
    return {key: value for key, value in h.env.items() if key not in _TEST_SIZED}


def wait_workers_ready(h: Harness, processes: int) -> None:
    """Wait until ``processes`` workers say ``ready`` in their heartbeats (each holds its partitions: no rebalance
    will move them mid-measurement)."""
    wait_for(lambda: h.scalar("SELECT count(*) FROM workers WHERE state = 'ready' AND last_beat > now() - "
                              "interval '10 seconds'") >= processes, timeout=300, what=f"{processes} worker(s) ready")


def static_model(dims: int) -> Path:
    """A model2vec model distilled from MiniLM to ``dims``, built once for every benchmark on this machine."""
    return distill_static(str(minilm_path()), _MODELS / f"static-{dims}", dims=dims)


class CpuMeter:
    """Cores each part of a run kept busy between :meth:`start` and :meth:`stop`: the Segue worker processes (a
    supervisor and its workers), PostgreSQL (every backend), the broker and this process (the publisher)."""

    def __init__(self, h: Harness, worker_pid: int):
        pids = service_pids(h.settings)
        self._roots = {"segue workers": worker_pid, "postgres": pids.get("postgres"), "broker": pids.get("kafka"),
                       "publisher": os.getpid()}

    def _times(self) -> dict[str, float]:
        busy = {}
        for part, pid in self._roots.items():
            if pid is None:
                continue
            root = psutil.Process(pid)
            family = [root] if part == "publisher" else [root, *root.children(recursive=True)]
            busy[part] = sum(_cpu_seconds(process) for process in family)
        return busy

    def start(self) -> None:
        self._started, self._before = time.perf_counter(), self._times()

    def stop(self) -> dict[str, float]:
        """Cores kept busy by each part (1.0 = one core all the time), and ``machine``: the cores there are."""
        wall, after = time.perf_counter() - self._started, self._times()
        cores = {part: (after[part] - self._before.get(part, 0.0)) / wall for part in after}
        return {**cores, "machine": float(len(os.sched_getaffinity(0)))}


def _cpu_seconds(process: psutil.Process) -> float:
    try:
        return sum(process.cpu_times()[:2])
    except psutil.NoSuchProcess:
        return 0.0


def describe_cores(cores: dict[str, float]) -> str:
    """``segue workers 1.2, postgres 0.5, … of 2 cores``."""
    parts = ", ".join(f"{part} {used:.2f}" for part, used in cores.items() if part != "machine")
    return f"{parts} (cores busy, of {cores['machine']:.0f})"


class Profiler:
    """py-spy sampling the worker processes of a run (``pip install py-spy``), and where their main threads went.

    Each sample is charged to the package of its innermost frame, so the table says whose code the
    main thread (the one running the event loop and every agent) was executing.
    """

    RATE = 200  # samples a second

    def __init__(self, worker_pid: int, folder: Path, label: str):
        root = psutil.Process(worker_pid)
        family = [root, *root.children(recursive=True)]
        self._targets = [p.pid for p in family if not p.children()]  # the workers, not their supervisor
        self._folder, self._label = folder, label
        self._runs: list[tuple[Path, subprocess.Popen]] = []

    def start(self) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        self._started = time.perf_counter()
        for pid in self._targets:
            output = self._folder / f"{self._label}-{pid}.folded"
            command = ["py-spy", "record", "--pid", str(pid), "--rate", str(self.RATE), "--format", "raw",
                       "--nonblocking", "--output", str(output)]
            self._runs.append((output, subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL)))

    def stop(self) -> str:
        """Stop sampling; one line per worker process: how busy its main thread was, and in whose code."""
        wall = time.perf_counter() - self._started
        lines = []
        for output, run in self._runs:
            run.send_signal(signal.SIGINT)
            run.wait(timeout=60)
            shares = _main_thread_shares(output)
            busy = (sum(shares.values()) - shares["waiting (epoll)"]) / (wall * self.RATE)
            total = sum(shares.values()) or 1
            parts = ", ".join(f"{name} {count / total:.0%}" for name, count in shares.most_common())
            lines.append(f"{output.name}: main thread busy {busy:.0%} of the time; samples by innermost frame: {parts}")
        return "\n".join(lines)


_PACKAGES = (("EpollSelector.select", "waiting (epoll)"), ("(faust/", "faust"), ("(mode/", "faust"), ("(aiokafka/", "aiokafka"), ("(psycopg", "psycopg"),
             ("(asyncio/", "asyncio loop"), ("(selectors.py", "asyncio loop"), ("(numpy/", "numpy"),
             ("(app/", "segue"), ("(agents/", "segue"), ("(schemas/", "segue"))


def _main_thread_shares(folded: Path) -> collections.Counter:
    """Samples of the main thread (every stack not rooted in a ``threading.Thread``) by the package of the innermost
    frame (py-spy names frames ``function (path:line)``, paths relative to their package root)."""
    shares: collections.Counter = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            continue
        leaf = frames[-1]
        shares[next((name for marker, name in _PACKAGES if marker in leaf), "other")] += int(count)
    return shares
