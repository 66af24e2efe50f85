"""JobRunner: claims jobs and trains them one at a time in a daemon thread, on the model its caller holds.

It keeps each job's lease while it trains, resumes a job from its checkpoint, and records the outcome. It never
imports the server: the server hands it a `Gate` that decides when a step may run (serving comes first).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Callable

from ..checkpoint import CHECKPOINT_DIR, STATE
from ..config import TrainConfig
from ..loop import train
from ..search import search
from .control import Gate, JobCancelled, JobControl, RunnerConfig, RunnerSignals
from .method import train_config
from .records import JobRecord, metric_name
from .store import JobStore

log = logging.getLogger("training.jobs")


class JobRunner:
    """Trains claimed jobs one at a time on `lm` (the caller's resident model) in a daemon thread."""

    def __init__(self, jobs: JobStore, lm, publish: Callable[[JobRecord, Path], object], gate: Gate | None = None,
                 config: RunnerConfig | None = None, on_progress: Callable[[JobRecord, dict], None] | None = None,
                 base_model: str | None = None):
        self.jobs, self.lm, self.publish = jobs, lm, publish
        self.base_model = base_model
        self.gate = gate or Gate()
        self.config = config or RunnerConfig()
        self.on_progress = on_progress
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.signals = RunnerSignals()  # read by each job's control at its steps
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fine-tuning", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Checkpoint the running job at its next step and hand it back to the queue."""
        self.signals.stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self.signals.cancelled.add(job_id)

    def _loop(self) -> None:
        try:  # below the server's threads where the OS allows it: serving first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self.signals.stop.is_set():
            try:
                rec = self.jobs.claim(self.owner, self.config.lease_s, self._mine)
            except Exception:  # a bad record must not stop the runner
                log.exception("claiming a job failed")
                rec = None
            if rec is None:
                self._wake.wait(self.config.poll_s)
                self._wake.clear()
                continue
            self.run_job(rec)

    def _mine(self, rec: JobRecord) -> bool:
        """Only jobs made for the model this runner holds (a worker with another model leaves them)."""
        return rec.base_model is None or self.base_model is None or rec.base_model == self.base_model

    def _renew(self, job_id: str, done: threading.Event) -> None:
        """Keep the lease while the job is ours, whatever the loop is doing (a long held-out eval included); if
        another runner took it over (this one was presumed dead), the loop stops at its next step."""
        while not done.wait(self.config.lease_s / 4):
            lost = False

            def change(r: JobRecord) -> None:
                nonlocal lost
                if r.lease_owner != self.owner or r.status != "running":
                    lost = True
                else:
                    r.lease_until = time.time() + self.config.lease_s
            try:
                self.jobs.update(job_id, change)
            except Exception:  # a failed renewal is retried; the lease outlives several
                log.exception("renewing the lease of %s failed", job_id)
            if lost:
                self.signals.lost.add(job_id)
                return

    def run_job(self, rec: JobRecord) -> None:
        """Train one claimed job to its end: succeeded (published), paused (the runner stops), cancelled, lost to
        another runner, or failed; the lease is renewed meanwhile."""
        self.current = rec.id
        renewed = threading.Event()
        threading.Thread(target=self._renew, args=(rec.id, renewed), name="lease", daemon=True).start()
        try:
            cfg = self._start(rec)
            control = JobControl(self.jobs, rec, cfg, config=self.config, gate=self.gate, signals=self.signals,
                                 on_progress=self.on_progress)
            if cfg.method == "auto":
                result = search(cfg, lm=self.lm, quiet=True, control=control,
                                on_candidate=partial(self._candidate, rec.id, cfg.task))
            else:
                result = train(cfg, lm=self.lm, quiet=True, control=control)
            if result.get("finished"):
                self._succeeded(rec, cfg, result, control.tokens_per_step)
            else:
                self.jobs.release(rec.id, self.owner)
                self.jobs.event(rec.id, f"paused at step {result.get('stopped_at_step')} (runner stopping); "
                                        "resumes from its checkpoint")
        except JobCancelled:
            if rec.id in self.signals.lost:
                self.jobs.event(rec.id, f"runner {self.owner} lost its lease and stopped", level="warn")
                return
            self._finish(rec.id, "cancelled", None)
            self.jobs.event(rec.id, "cancelled")
        except Exception as e:  # the job fails, the runner goes on
            log.exception("job %s failed", rec.id)
            message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            self._finish(rec.id, "failed", {"code": "training_failed", "message": message[:2000], "param": None})
            self.jobs.event(rec.id, f"failed: {message[:500]}", level="error")
        finally:
            renewed.set()
            self.current = None
            self.signals.forget(rec.id)

    def _start(self, rec: JobRecord) -> TrainConfig:
        """The job's TrainConfig, resuming from its checkpoint when there is one; a first start says so."""
        cfg = train_config(rec, self.jobs.job_dir(rec.id), device=str(self.lm.device), dtype=None)
        cfg.resume = (cfg.out / CHECKPOINT_DIR / STATE).is_file()
        if rec.attempts == 1 and not cfg.resume:
            lr = f"lr {cfg.lr:g}" if cfg.lr is not None else f"time budget {cfg.time_budget_s:g} s"
            self.jobs.event(rec.id, f"training {cfg.method} ({cfg.task}): {cfg.epochs} epochs, {lr}, "
                                    f"batch {cfg.batch_size}, seed {cfg.seed}")
        return cfg

    def _candidate(self, job_id: str, task: str, row: dict) -> None:
        """`--method auto`: one event per finished candidate (once, also when a resumed search reports it again)."""
        if not any(e.get("data", {}).get("candidate") == row["name"] for e in self.jobs.events(job_id)):
            self.jobs.event(job_id, f"candidate {row['name']}: held-out {metric_name(task)} {row['score']:.1f} at "
                                    f"epoch {row['best_epoch']} ({row['seconds']:.0f} s)",
                            type_="metrics", data={"candidate": row["name"], **row})

    def _succeeded(self, rec: JobRecord, cfg: TrainConfig, result: dict, tokens_per_step: float) -> None:
        """Publish the trained prompt as the job's task, then record the outcome."""
        task = self.publish(rec, cfg.out)
        metric = metric_name(cfg.task)
        score = result.get("best_score")

        def done(r: JobRecord) -> None:
            r.status, r.finished_at, r.estimated_finish = "succeeded", int(time.time()), None
            r.fine_tuned_model, r.result = getattr(task, "id", rec.task_id), result
            r.trained_tokens = max(r.trained_tokens, int(tokens_per_step * r.step))
            r.lease_owner, r.lease_until = None, 0.0
        self.jobs.update(rec.id, done)
        won = f"{result['winner']} won the search; " if result.get("winner") else ""
        seconds = result.get("search_seconds") or result.get("train_seconds")
        self.jobs.event(rec.id, f"succeeded: {rec.task_id} ({won}best held-out {metric} {score:.1f} at epoch "
                                f"{result.get('best_epoch')}, {seconds} s)",
                        data={metric: score, "best_epoch": result.get("best_epoch"), "winner": result.get("winner")})

    def _finish(self, job_id: str, status: str, error: dict | None) -> None:
        def change(r: JobRecord) -> None:
            r.status, r.finished_at, r.error, r.estimated_finish = status, int(time.time()), error, None
            r.lease_owner, r.lease_until = None, 0.0
        self.jobs.update(job_id, change)
