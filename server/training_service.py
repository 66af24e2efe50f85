"""Fine-tuning inside the server: the files and job stores on the prompt store's directory, a runner thread that
trains on the resident model, the gate that keeps serving first, and publishing a finished job as a task.

Serving first: a training step starts only when the engine has no request in flight, or, while it is busy, only
as long as training has used less than `--training-share` of the last `WINDOW_S` seconds. A request that arrives
during a step waits for at most that one step (the runner thread also runs at a lower OS priority); a light load
keeps its latency and an idle server trains at full speed. One job trains at a time per server process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from training.files import FileLimits, FileStore
from training.jobs import Gate, JobRunner, JobStore, RunnerConfig, publish_task

if TYPE_CHECKING:
    from prompt_core.model import LoadedModel
    from prompt_store.store import PromptStore
    from server.config import Settings
    from server.engine.async_engine import AsyncEngine
    from server.metrics import Metrics

log = logging.getLogger("server.fine_tuning")  # the name operators filter on, kept from before the rename

WINDOW_S = 10.0


class ServingGate(Gate):
    """Lets a training step run when the engine is idle, or within `share` of the time while it is busy."""

    def __init__(self, engine, share: float, window_s: float = WINDOW_S, poll_s: float = 0.002):
        self.engine, self.share, self.window_s, self.poll_s = engine, share, window_s, poll_s
        self._steps: deque[tuple[float, float]] = deque()   # (end time, seconds) of recent steps
        self.waited_s = 0.0

    def busy(self) -> bool:
        e = self.engine() if callable(self.engine) else self.engine
        return e is not None and e.ready and e.in_flight > 0

    def _used(self, now: float) -> float:
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()
        return sum(s for _, s in self._steps)

    def wait(self, stop: threading.Event) -> None:
        t0 = time.monotonic()
        while not stop.is_set() and self.busy():
            if self.share > 0 and self._used(time.monotonic()) < self.share * self.window_s:
                break
            time.sleep(self.poll_s)
        self.waited_s += time.monotonic() - t0

    def done(self, seconds: float) -> None:
        self._steps.append((time.monotonic(), seconds))


class TrainingCollector(Collector):
    """Jobs by state, queue length and training throughput, read at scrape time from the job store."""

    def __init__(self, jobs: JobStore, stats: dict):
        self.jobs, self.stats = jobs, stats

    def describe(self):
        return []

    def collect(self):
        by_state = GaugeMetricFamily("promptserve_fine_tuning_jobs", "fine-tuning jobs by state", labels=["state"])
        counts: dict[str, int] = {s: 0 for s in ("validating_files", "queued", "running", "succeeded", "failed",
                                                  "cancelled")}
        for rec in self.jobs.list():
            counts[rec.status] = counts.get(rec.status, 0) + 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        queue = GaugeMetricFamily("promptserve_fine_tuning_queue_length", "jobs waiting for a runner")
        queue.add_metric([], counts["queued"])
        yield queue
        tokens = CounterMetricFamily("promptserve_training_tokens", "tokens trained on by this process")
        tokens.add_metric([], self.stats["tokens"])
        yield tokens
        rate = GaugeMetricFamily("promptserve_training_tokens_per_second", "training tokens per second of "
                                 "training step time, last step")
        rate.add_metric([], self.stats["tokens_per_s"])
        yield rate


def open_fine_tuning(settings: Settings, *, loaded: LoadedModel, store: PromptStore, metrics: Metrics, stats: dict,
                     engine: Callable[[], AsyncEngine | None]) -> tuple[FileStore, JobStore, JobRunner | None]:
    """Called by Runtime.open once the model, store and engine are up: the file and job stores (their metrics
    registered; `stats` is where training throughput is counted), and the job runner thread, started, if this
    process trains (else None). It trains on `loaded`, gated by `engine`'s load, and publishes to `store`."""
    s = settings
    files = FileStore(s.store, FileLimits(max_file_bytes=s.max_file_bytes,
                                          max_tenant_bytes=s.max_file_bytes_per_tenant))
    jobs = JobStore(s.store)
    metrics.registry.register(TrainingCollector(jobs, stats))
    if not s.training_runner:
        return files, jobs, None
    if loaded.quantization != "none":
        log.warning("--quantize %s: quantized layers have no gradient, so this server does not train; fine-tuning "
                    "jobs wait for a training worker (python -m training.worker)", loaded.quantization)
        return files, jobs, None

    def progress(_rec, info: dict) -> None:
        stats["tokens"] += info["tokens"]
        stats["tokens_per_s"] = info["tokens"] / max(info["step_seconds"], 1e-9)

    gate = ServingGate(engine, s.training_share)
    runner = JobRunner(jobs, loaded, lambda rec, out: publish_task(store, rec, out), gate=gate,
                       base_model=store.fingerprint.embedding_sha256,
                       config=RunnerConfig(checkpoint_every_s=s.training_checkpoint_s,
                                           micro_batch=s.training_micro_batch or None), on_progress=progress)
    runner.start()
    return files, jobs, runner
