"""The training loop's hooks for one job (the gate before each step and between micro-batches, cancel, periodic
checkpoints, progress events and the ETA), and what a runner hands them: its config, its gate and its signals.

The runner owns the signals and passes them in, so the control reads three flags and never the runner itself.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import TrainConfig
from ..loop import Control, Run
from .records import JobRecord, new_id
from .store import JobStore


class JobCancelled(Exception):
    """Raised inside the training loop when the job was cancelled; nothing is published."""


@dataclass
class RunnerConfig:
    lease_s: float = 60.0            # a runner that stops renewing for this long loses its job to another
    checkpoint_every_s: float = 30.0  # at most this much training is redone after a crash (plus epoch ends)
    poll_s: float = 0.5              # how often an idle runner looks for queued jobs
    event_every_s: float = 2.0       # step events at most this often (every epoch and the first step always)
    micro_batch: int | None = None   # rows per forward/backward within a step; the gate is asked between them


class Gate:
    """When a step may run. The default never waits; the server's gate yields to serving."""

    def wait(self, stop: threading.Event) -> None:
        return None

    def done(self, seconds: float) -> None:
        return None


@dataclass
class RunnerSignals:
    """What a runner's other threads tell the job it trains: `stop` (checkpoint and hand the job back), the jobs
    cancelled in this process, and the jobs whose lease another runner took over."""
    stop: threading.Event = field(default_factory=threading.Event)
    cancelled: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)

    def ended(self, job_id: str) -> bool:
        """Cancelled here, or no longer ours: either way the job must not train another step."""
        return job_id in self.cancelled or job_id in self.lost

    def forget(self, job_id: str) -> None:
        self.cancelled.discard(job_id)
        self.lost.discard(job_id)


class JobControl(Control):
    """The loop's hooks for one job: gate, cancel, lease renewal, periodic checkpoints, events, ETA."""

    def __init__(self, jobs: JobStore, rec: JobRecord, cfg: TrainConfig, *, config: RunnerConfig, gate: Gate,
                 signals: RunnerSignals, on_progress: Callable[[JobRecord, dict], None] | None = None):
        self.jobs, self.rec, self.cfg = jobs, rec, cfg
        self.config, self.gate, self.signals, self.on_progress = config, gate, signals, on_progress
        now = time.monotonic()
        self.last_checkpoint = self.last_event = self.last_sync = now
        self.step_times: list[float] = []
        self.t_step = 0.0
        self.tokens_per_step = 0.0
        self.first = True
        self.micro_batch = config.micro_batch

    def _cancelled(self) -> bool:
        if self.signals.ended(self.rec.id):
            return True
        if time.monotonic() - self.last_sync > 1.0:  # another process (an API replica) may have asked
            self.last_sync = time.monotonic()
            return self.jobs.get(self.rec.id).cancel_requested
        return False

    def before_step(self, run: Run) -> bool:
        if self._cancelled():
            raise JobCancelled()
        if self.signals.stop.is_set():
            return False
        self.gate.wait(self.signals.stop)
        if self.signals.stop.is_set():
            return False
        if self.first:
            per_epoch = math.ceil(len(run.train_rows) / self.cfg.batch_size)
            self.total = per_epoch * self.cfg.epochs
            self.tokens_per_step = sum(r.plan.num_tokens for r in run.train_rows) / max(1, len(run.train_rows)) \
                * self.cfg.batch_size
        self.t_step = self.t_part = time.monotonic()
        return True

    def between_micro_batches(self, run: Run) -> None:
        now = time.monotonic()
        self.gate.done(now - self.t_part)
        self.gate.wait(self.signals.stop)  # a stop waits for the step's end: the checkpoint needs whole steps
        waited = time.monotonic() - now
        self.t_step += waited  # the step's time is compute time, for the ETA and tokens/s
        self.t_part = time.monotonic()

    def after_step(self, run: Run, loss: float) -> bool:
        now = time.monotonic()
        took = now - self.t_step
        self.gate.done(now - self.t_part)
        self.step_times = (self.step_times + [took])[-50:]
        step = run.state.global_step
        left = max(0, self.total - step)
        eta = int(time.time() + left * sum(self.step_times) / len(self.step_times))
        checkpoint = now - self.last_checkpoint >= self.config.checkpoint_every_s
        if checkpoint:
            self.last_checkpoint = now
        if self.first or checkpoint or now - self.last_event >= self.config.event_every_s:
            self.first = False
            self.last_event = now
            lease = time.time() + self.config.lease_s
            tokens = int(step * self.tokens_per_step)

            def change(r: JobRecord) -> None:
                r.step, r.total_steps, r.estimated_finish, r.trained_tokens = step, self.total, eta, tokens
                r.lease_until = lease
            self.jobs.update(self.rec.id, change)
            self.jobs.event(self.rec.id, f"step {step}/{self.total}: training loss {loss:.4f}", type_="metrics",
                            data={"step": step, "total_steps": self.total, "train_loss": loss,
                                  "epoch": run.state.epoch + 1, "estimated_finish": eta})
        if self.on_progress is not None:
            self.on_progress(self.rec, {"step_seconds": took, "tokens": self.tokens_per_step})
        return checkpoint

    def after_epoch(self, run: Run, record: dict) -> None:
        metric = "accuracy" if self.cfg.task == "classify" else "exact_match"
        ckpt = {"id": new_id("ftckpt"), "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                "fine_tuning_job_id": self.rec.id, "step_number": record["step"],
                "fine_tuned_model_checkpoint": f"{self.rec.task_id}:epoch-{record['epoch']}",
                "metrics": {"step": record["step"], "train_loss": record["train_loss"],
                            **{k: v for k, v in record.items() if k in ("accuracy", "exact_match", "token_f1")}}}
        lease = time.time() + self.config.lease_s

        def change(r: JobRecord) -> None:
            r.checkpoints = [c for c in r.checkpoints if c["step_number"] != record["step"]] + [ckpt]
            r.lease_until, r.step = lease, record["step"]
        self.jobs.update(self.rec.id, change)
        self.last_checkpoint = time.monotonic()
        self.jobs.event(self.rec.id, f"epoch {record['epoch']}: training loss {record['train_loss']:.4f}, held-out "
                                     f"{metric} {record[metric]:.1f}", type_="metrics",
                        data={k: v for k, v in record.items()})
