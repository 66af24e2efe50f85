"""Fine-tuning jobs as durable records on the shared store, and the runner that trains them.

Layout: ROOT/fine_tuning/<job-id>/
    job.json          the record (OpenAI's fields and states); replaced atomically under ROOT/fine_tuning/.lock
    events.jsonl      one event per line, appended (a torn last line after a crash is skipped)
    train.jsonl, valid.jsonl   the job's own copy of its files, so deleting a file never breaks a resume
    run/              the training module's output folder: checkpoint/, log.jsonl, the artifact, results.json

A job is claimed under the lock with a lease (owner host:pid:runner, expiry). A runner renews it while it trains;
a job whose lease expired, or whose owner process on this host is gone (kill -9, restart), is claimed again and
resumes from run/checkpoint, the same data order, optimizer moments and schedule (training/checkpoint.py), so the
finished prompt equals an uninterrupted run's. Training goes through training.loop.train, the CLI's code, on the
model the caller already holds. The runner never imports the server: the server hands it a `gate` that decides
when a step may run (serving comes first).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import save_file

from prompt_core.spec import make_labels
from prompt_store.disk import pid_alive
from prompt_store.errors import InvalidPrompt, QuotaExceeded, TaskNotFound

from .checkpoint import CHECKPOINT_DIR, STATE
from .config import TrainConfig
from .data import load_jsonl
from .export import ARTIFACT_FILES
from .files import FileRecord, FileStore, write_json_atomic
from .loop import Control, Run, train
from .methods import make_spec
from .search import search

log = logging.getLogger("training.jobs")

JOB_NAME = "job.json"
EVENTS_NAME = "events.jsonl"
RUN_DIR = "run"
INIT_NAME = "init.safetensors"
API_METHODS = {"prompt_tuning": "prompt-tuning", "p_tuning": "p-tuning", "prefix_tuning": "prefix-tuning",
               "auto": "auto"}
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
# hyperparameters a job may set: the CLI's options under their API names (same names where they exist)
HYPER = {"n_epochs": "epochs", "learning_rate": "lr", "batch_size": "batch_size",
         "num_virtual_tokens": "virtual_tokens", "init": "init", "init_text": "init_text", "encoder": "encoder",
         "encoder_hidden": "encoder_hidden", "prefix_projection": "prefix_projection",
         "eval_fraction": "eval_fraction", "patience": "patience", "max_new_tokens": "max_new_tokens",
         "time_budget_s": "time_budget_s"}


class JobNotFound(TaskNotFound):
    """No such job for this tenant (404); another tenant's job reads exactly like a missing one."""


class JobCancelled(Exception):
    """Raised inside the training loop when the job was cancelled; nothing is published."""


@dataclass
class JobRecord:
    id: str
    tenant: str
    open: bool                        # created in open mode (no auth file): the task gets no owner
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    method: dict                      # {"type", "task_type", "labels", "template", "hyperparameters"} (filled in)
    status: str = "validating_files"
    created_at: int = field(default_factory=lambda: int(time.time()))
    started_at: int | None = None
    finished_at: int | None = None
    fine_tuned_model: str | None = None   # the task id it publishes (fixed at creation; set on the wire at success)
    task_id: str = ""
    error: dict | None = None
    trained_tokens: int = 0
    step: int = 0
    total_steps: int = 0
    estimated_finish: int | None = None
    result: dict | None = None
    checkpoints: list[dict] = field(default_factory=list)
    metadata: dict | None = None
    init_from: str | None = None      # "task@version" whose prompt the job continues (job dir: init.safetensors)
    base_model: str | None = None     # embedding sha256 of the model it trains on: only such a runner claims it
    cancel_requested: bool = False
    attempts: int = 0                 # claims so far (1 + resumes)
    lease_owner: str | None = None
    lease_until: float = 0.0

    @property
    def train_config_method(self) -> str:
        return API_METHODS[self.method["type"]]


def metric_name(task: str) -> str:
    return "accuracy" if task == "classify" else "exact_match"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class JobStore:
    """Records and events of every job; several processes (server replicas, workers) may share ROOT."""

    def __init__(self, root: Path | str, fsync: bool = True):
        self.root = Path(root)
        self.dir = self.root / "fine_tuning"
        self.staging = self.root / "tmp"
        self.fsync = fsync
        self._tlock = threading.RLock()
        for d in (self.dir, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across threads and processes (record updates are read-modify-write)."""
        with self._tlock:
            with open(self.dir / ".lock", "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def job_dir(self, job_id: str) -> Path:
        return self.dir / job_id

    def _read(self, job_id: str) -> JobRecord | None:
        if not isinstance(job_id, str) or not job_id.startswith("ftjob-") or "/" in job_id or ".." in job_id:
            return None
        try:
            return JobRecord(**json.loads((self.dir / job_id / JOB_NAME).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def get(self, job_id: str, tenant: str | None = None, admin: bool = True) -> JobRecord:
        rec = self._read(job_id)
        if rec is None or (not admin and rec.tenant != tenant):
            raise JobNotFound(f"no fine-tuning job {job_id!r}")
        return rec

    def list(self, tenant: str | None = None, admin: bool = True) -> list[JobRecord]:
        """Newest first."""
        out = []
        for d in self.dir.iterdir():
            rec = self._read(d.name) if d.is_dir() else None
            if rec is not None and (admin or rec.tenant == tenant):
                out.append(rec)
        return sorted(out, key=lambda r: (r.created_at, r.id), reverse=True)

    def _write(self, rec: JobRecord) -> None:
        write_json_atomic(self.dir / rec.id / JOB_NAME, asdict(rec), self.staging, self.fsync)

    def create(self, rec: JobRecord, files: dict[str, Path]) -> JobRecord:
        """Published by one rename: the record and its own copies of the data appear together."""
        stage = self.staging / f"job-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            for name, src in files.items():
                shutil.copyfile(src, stage / name)
            (stage / EVENTS_NAME).touch()
            (stage / JOB_NAME).write_text(json.dumps(asdict(rec), indent=1, sort_keys=True) + "\n")
            os.rename(stage, self.dir / rec.id)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return rec

    def update(self, job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
        with self.locked():
            rec = self.get(job_id)
            change(rec)
            self._write(rec)
            return rec

    # ---- events
    def event(self, job_id: str, message: str, level: str = "info", data: dict | None = None,
              type_: str = "message") -> dict:
        ev = {"id": new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": int(time.time()),
              "level": level, "message": message, "data": data or {}, "type": type_}
        line = (json.dumps(ev) + "\n").encode()
        fd = os.open(self.dir / job_id / EVENTS_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one line: appends never interleave within a line
        finally:
            os.close(fd)
        log.info("%s: %s", job_id, message)
        return ev

    def events(self, job_id: str) -> list[dict]:
        """Oldest first; a torn last line (a crash mid-append) is skipped."""
        out = []
        try:
            text = (self.dir / job_id / EVENTS_NAME).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # ---- claiming
    def claim(self, owner: str, lease_s: float, job_filter: Callable[[JobRecord], bool] = lambda r: True
              ) -> JobRecord | None:
        """The oldest job that is queued, or running under an expired lease or a dead process on this host."""
        with self.locked():
            now = time.time()
            for rec in sorted(self.list(), key=lambda r: (r.created_at, r.id)):
                claimable = rec.status == "queued" or (rec.status == "running" and orphaned(rec, now))
                if not claimable or not job_filter(rec):
                    continue
                resumed = rec.status == "running"
                rec.status, rec.lease_owner, rec.lease_until = "running", owner, now + lease_s
                rec.attempts += 1
                rec.started_at = rec.started_at or int(now)
                self._write(rec)
                if resumed:
                    self.event(rec.id, f"resuming (attempt {rec.attempts}): the previous runner stopped")
                return rec
        return None

    def release(self, job_id: str, owner: str) -> None:
        """Back to the queue (the runner is stopping); it resumes from its checkpoint wherever it is claimed next."""
        def change(r: JobRecord) -> None:
            if r.status == "running" and r.lease_owner == owner:
                r.status, r.lease_owner, r.lease_until = "queued", None, 0.0
        self.update(job_id, change)


def orphaned(rec: JobRecord, now: float) -> bool:
    if rec.lease_until < now:
        return True
    host, _, rest = (rec.lease_owner or "").partition(":")
    pid = rest.split(":", 1)[0]
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


# ---- validation: what a job request means, checked before anything is queued

def normalize_method(method: dict | None, file_tasks: list[str]) -> dict:
    """Fill the CLI's defaults into a job's method; InvalidPrompt (422) names a bad field."""
    m = dict(method or {})
    kind = m.get("type", "prompt_tuning")
    if kind not in API_METHODS:
        raise InvalidPrompt(f"method.type expected one of {sorted(API_METHODS)}, found {kind!r}")
    opts = dict(m.get(kind) or {})
    unknown = sorted(set(opts) - {"hyperparameters", "task_type", "labels", "template"})
    if unknown:
        raise InvalidPrompt(f"method.{kind} has unknown fields {unknown}")
    hyper = dict(opts.get("hyperparameters") or {})
    unknown = sorted(set(hyper) - set(HYPER))
    if unknown:
        raise InvalidPrompt(f"method.{kind}.hyperparameters has unknown fields {unknown}; expected {sorted(HYPER)}")
    for k, v in list(hyper.items()):
        if v == "auto" or v is None:  # OpenAI's clients send "auto" for "your default"
            del hyper[k]
    task = opts.get("task_type")
    if task is None:
        task = file_tasks[0] if len(file_tasks) == 1 else ("classify" if opts.get("labels") else "generate")
    if task not in ("classify", "generate"):
        raise InvalidPrompt(f"method.{kind}.task_type expected 'classify' or 'generate', found {task!r}")
    if task not in file_tasks:
        raise InvalidPrompt(f"training_file holds {file_tasks[0]} lines, not {task} ones")
    labels = opts.get("labels")
    if labels is not None:
        if task != "classify":
            raise InvalidPrompt(f"method.{kind}.labels is for task_type 'classify'")
        try:
            labels = [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in make_labels(labels)]
        except (ValueError, TypeError) as e:
            raise InvalidPrompt(f"method.{kind}.labels: {e}") from None
    template = opts.get("template", "{input}")
    if not isinstance(template, str):
        raise InvalidPrompt(f"method.{kind}.template must be a string")
    return {"type": kind, "task_type": task, "labels": labels, "template": template, "hyperparameters": hyper}


def train_config(rec: JobRecord, job_dir: Path, device: str | None = None, dtype: str | None = None,
                 labels_from_data: bool = True) -> TrainConfig:
    """The TrainConfig of a job: exactly what `python -m training train` builds from the same options."""
    m = rec.method
    data = job_dir / "train.jsonl"
    labels = ()
    if m["task_type"] == "classify":
        if m["labels"]:
            labels = make_labels({x["name"]: x["verbalizer"] for x in m["labels"]})
        elif labels_from_data:
            labels = make_labels(sorted({e.target for e in load_jsonl(data, "classify")}))
    kw = {HYPER[k]: v for k, v in m["hyperparameters"].items()}
    if rec.init_from:
        kw["init_from"] = job_dir / INIT_NAME
    return TrainConfig(method=API_METHODS[m["type"]], task=m["task_type"], data=data, out=job_dir / RUN_DIR,
                       eval_data=job_dir / "valid.jsonl" if rec.validation_file else None, labels=labels,
                       template=m["template"], seed=rec.seed, device=device, dtype=dtype,
                       extra={"task_id": rec.task_id, "description": describe(rec)}, **kw)


def describe(rec: JobRecord) -> str:
    return f"{rec.method['type']} ({rec.method['task_type']}) trained by fine-tuning job {rec.id}"


def validate_job(rec: JobRecord, train_file: Path, valid_file: Path | None) -> None:
    """Everything that can be known before training: options, labels against the data, the template. Errors name
    the file and line (InvalidPrompt, 422)."""
    try:
        cfg = train_config(rec, train_file.parent, labels_from_data=False)
        cfg.data, cfg.eval_data = train_file, valid_file
        names = {x["name"] for x in rec.method["labels"]} if rec.method["labels"] else None
        train_ex = load_jsonl(train_file, cfg.task, names)
        if cfg.task == "classify" and names is None:
            names = {e.target for e in train_ex}
            if len(names) < 2:
                raise ValueError(f"{train_file}: a classify job needs at least two labels, found {sorted(names)}")
        if valid_file is not None:
            load_jsonl(valid_file, cfg.task, names)
        elif len(train_ex) < 2:
            raise ValueError(f"{train_file}: need at least 2 examples to hold some out, or a validation_file")
        spec = make_spec(cfg, cfg.labels or (make_labels(sorted(names)) if names else ()))
    except (ValueError, TypeError) as e:
        message = str(e).replace(str(train_file), rec.training_file)
        if valid_file is not None:
            message = message.replace(str(valid_file), str(rec.validation_file))
        raise InvalidPrompt(message) from None
    rec.method["resolved"] = {"n_epochs": cfg.epochs, "batch_size": cfg.batch_size, "learning_rate": cfg.lr,
                              "num_virtual_tokens": spec.num_virtual_tokens}


# ---- the runner

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
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cancel: set[str] = set()
        self._lost: set[str] = set()
        self._thread: threading.Thread | None = None
        self.current: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fine-tuning", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Checkpoint the running job at its next step and hand it back to the queue."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    def _loop(self) -> None:
        try:  # below the server's threads where the OS allows it: serving first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            try:
                rec = self.jobs.claim(self.owner, self.config.lease_s, self._mine)
            except Exception:  # noqa: BLE001 - a bad record must not stop the runner
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
            except Exception:  # noqa: BLE001 - a failed renewal is retried; the lease outlives several
                log.exception("renewing the lease of %s failed", job_id)
            if lost:
                self._lost.add(job_id)
                return

    def run_job(self, rec: JobRecord) -> None:
        self.current = rec.id
        job_dir = self.jobs.job_dir(rec.id)
        renewed = threading.Event()
        threading.Thread(target=self._renew, args=(rec.id, renewed), name="lease", daemon=True).start()
        try:
            cfg = train_config(rec, job_dir, device=str(self.lm.device), dtype=None)
            cfg.resume = (cfg.out / CHECKPOINT_DIR / STATE).is_file()
            if rec.attempts == 1 and not cfg.resume:
                lr = f"lr {cfg.lr:g}" if cfg.lr is not None else f"time budget {cfg.time_budget_s:g} s"
                self.jobs.event(rec.id, f"training {cfg.method} ({cfg.task}): {cfg.epochs} epochs, {lr}, "
                                        f"batch {cfg.batch_size}, seed {cfg.seed}")
            control = _JobControl(self, rec, cfg)
            if cfg.method == "auto":
                def candidate(row: dict) -> None:
                    if not any(e.get("data", {}).get("candidate") == row["name"] for e in self.jobs.events(rec.id)):
                        self.jobs.event(rec.id, f"candidate {row['name']}: held-out {metric_name(cfg.task)} "
                                                f"{row['score']:.1f} at epoch {row['best_epoch']} "
                                                f"({row['seconds']:.0f} s)",
                                        type_="metrics", data={"candidate": row["name"], **row})
                result = search(cfg, lm=self.lm, quiet=True, control=control, on_candidate=candidate)
            else:
                result = train(cfg, lm=self.lm, quiet=True, control=control)
            if not result.get("finished"):
                self.jobs.release(rec.id, self.owner)
                self.jobs.event(rec.id, f"paused at step {result.get('stopped_at_step')} (runner stopping); "
                                        "resumes from its checkpoint")
                return
            task = self.publish(rec, cfg.out)
            metric = metric_name(cfg.task)
            score = result.get("best_score")

            def done(r: JobRecord) -> None:
                r.status, r.finished_at, r.estimated_finish = "succeeded", int(time.time()), None
                r.fine_tuned_model, r.result = getattr(task, "id", rec.task_id), result
                r.trained_tokens = max(r.trained_tokens, int(control.tokens_per_step * r.step))
                r.lease_owner, r.lease_until = None, 0.0
            self.jobs.update(rec.id, done)
            won = f"{result['winner']} won the search; " if result.get("winner") else ""
            seconds = result.get("search_seconds") or result.get("train_seconds")
            self.jobs.event(rec.id, f"succeeded: {rec.task_id} ({won}best held-out {metric} {score:.1f} at epoch "
                                    f"{result.get('best_epoch')}, {seconds} s)",
                            data={metric: score, "best_epoch": result.get("best_epoch"),
                                  "winner": result.get("winner")})
        except JobCancelled:
            if rec.id in self._lost:
                self.jobs.event(rec.id, f"runner {self.owner} lost its lease and stopped", level="warn")
                return
            self._finish(rec.id, "cancelled", None)
            self.jobs.event(rec.id, "cancelled")
        except Exception as e:  # noqa: BLE001 - the job fails, the runner goes on
            log.exception("job %s failed", rec.id)
            message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            self._finish(rec.id, "failed", {"code": "training_failed", "message": message[:2000], "param": None})
            self.jobs.event(rec.id, f"failed: {message[:500]}", level="error")
        finally:
            renewed.set()
            self.current = None
            self._cancel.discard(rec.id)
            self._lost.discard(rec.id)

    def _finish(self, job_id: str, status: str, error: dict | None) -> None:
        def change(r: JobRecord) -> None:
            r.status, r.finished_at, r.error, r.estimated_finish = status, int(time.time()), error, None
            r.lease_owner, r.lease_until = None, 0.0
        self.jobs.update(job_id, change)


class _JobControl(Control):
    """The loop's hooks for one job: gate, cancel, lease renewal, periodic checkpoints, events, ETA."""

    def __init__(self, runner: JobRunner, rec: JobRecord, cfg: TrainConfig):
        self.runner, self.rec, self.cfg = runner, rec, cfg
        self.jobs = runner.jobs
        now = time.monotonic()
        self.last_checkpoint = self.last_event = self.last_sync = now
        self.step_times: list[float] = []
        self.t_step = 0.0
        self.tokens_per_step = 0.0
        self.first = True
        self.micro_batch = runner.config.micro_batch

    def _cancelled(self) -> bool:
        if self.rec.id in self.runner._cancel or self.rec.id in self.runner._lost:
            return True
        if time.monotonic() - self.last_sync > 1.0:  # another process (an API replica) may have asked
            self.last_sync = time.monotonic()
            return self.jobs.get(self.rec.id).cancel_requested
        return False

    def before_step(self, run: Run) -> bool:
        if self._cancelled():
            raise JobCancelled()
        if self.runner._stop.is_set():
            return False
        self.runner.gate.wait(self.runner._stop)
        if self.runner._stop.is_set():
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
        self.runner.gate.done(now - self.t_part)
        self.runner.gate.wait(self.runner._stop)  # a stop waits for the step's end: the checkpoint needs whole steps
        waited = time.monotonic() - now
        self.t_step += waited  # the step's time is compute time, for the ETA and tokens/s
        self.t_part = time.monotonic()

    def after_step(self, run: Run, loss: float) -> bool:
        now = time.monotonic()
        took = now - self.t_step
        self.runner.gate.done(now - self.t_part)
        self.step_times = (self.step_times + [took])[-50:]
        step = run.state.global_step
        left = max(0, self.total - step)
        eta = int(time.time() + left * sum(self.step_times) / len(self.step_times))
        checkpoint = now - self.last_checkpoint >= self.runner.config.checkpoint_every_s
        if checkpoint:
            self.last_checkpoint = now
        if self.first or checkpoint or now - self.last_event >= self.runner.config.event_every_s:
            self.first = False
            self.last_event = now
            lease = time.time() + self.runner.config.lease_s
            tokens = int(step * self.tokens_per_step)

            def change(r: JobRecord) -> None:
                r.step, r.total_steps, r.estimated_finish, r.trained_tokens = step, self.total, eta, tokens
                r.lease_until = lease
            self.jobs.update(self.rec.id, change)
            self.jobs.event(self.rec.id, f"step {step}/{self.total}: training loss {loss:.4f}", type_="metrics",
                            data={"step": step, "total_steps": self.total, "train_loss": loss,
                                  "epoch": run.state.epoch + 1, "estimated_finish": eta})
        if self.runner.on_progress is not None:
            self.runner.on_progress(self.rec, {"step_seconds": took, "tokens": self.tokens_per_step})
        return checkpoint

    def after_epoch(self, run: Run, record: dict) -> None:
        metric = "accuracy" if self.cfg.task == "classify" else "exact_match"
        ckpt = {"id": new_id("ftckpt"), "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                "fine_tuning_job_id": self.rec.id, "step_number": record["step"],
                "fine_tuned_model_checkpoint": f"{self.rec.task_id}:epoch-{record['epoch']}",
                "metrics": {"step": record["step"], "train_loss": record["train_loss"],
                            **{k: v for k, v in record.items() if k in ("accuracy", "exact_match", "token_f1")}}}
        lease = time.time() + self.runner.config.lease_s

        def change(r: JobRecord) -> None:
            r.checkpoints = [c for c in r.checkpoints if c["step_number"] != record["step"]] + [ckpt]
            r.lease_until, r.step = lease, record["step"]
        self.jobs.update(self.rec.id, change)
        self.last_checkpoint = time.monotonic()
        self.jobs.event(self.rec.id, f"epoch {record['epoch']}: training loss {record['train_loss']:.4f}, held-out "
                                     f"{metric} {record[metric]:.1f}", type_="metrics",
                        data={k: v for k, v in record.items()})


def publish_task(store, rec: JobRecord, out: Path):
    """The finished job's artifact becomes task `rec.task_id` of its tenant. Idempotent: a runner that died after
    publishing and before marking the job succeeded finds the task there and does not add a second version."""
    try:
        existing = store.get(rec.task_id, None, admin=True)
        if rec.id in existing.description:
            return existing
    except TaskNotFound:
        pass
    results = json.loads((out / "results.json").read_text())
    metric = "accuracy" if rec.method["task_type"] == "classify" else "exact_match"
    won = (f"auto search winner {results['winner']} of "
           + ", ".join(f"{c['name']} {c['score']:.1f}" for c in results["candidates"] if c["score"] is not None)
           + "; ") if results.get("winner") else ""
    description = (f"{rec.method['type']} ({rec.method['task_type']}) trained by fine-tuning job {rec.id}: {won}"
                   f"held-out {metric} {results['best_score']:.1f} at epoch {results['best_epoch']}, "
                   f"{results['train_examples']} training examples")
    with tempfile.TemporaryDirectory(prefix="publish-", dir=store.staging_dir) as tmp:
        for name in ARTIFACT_FILES:  # only the artifact: logs, checkpoints and the PEFT copy stay with the job
            if (out / name).is_file():
                shutil.copyfile(out / name, Path(tmp) / name)
        return store.create(rec.task_id, None if rec.open else rec.tenant, source_dir=Path(tmp),
                            metadata={"description": description}, admin=False)



def create_job(jobs: JobStore, files: FileStore, *, tenant: str, open_mode: bool, admin: bool, model: str,
               training_file: str, validation_file: str | None, suffix: str | None, seed: int | None,
               method: dict | None, max_active: int, metadata: dict | None = None,
               continue_from: dict | None = None, base_model: str | None = None) -> JobRecord:
    """Check the request, the files and the tenant's quota of active jobs; then queue the job durably.

    `continue_from` ({"key", "kind", "template", "labels", "task_type", "num_virtual_tokens", "tensors"}) is a task
    of the tenant whose prompt the job starts from; its method, template, labels and size are the defaults."""
    train_rec = files.get(training_file, tenant, admin)
    valid_rec: FileRecord | None = files.get(validation_file, tenant, admin) if validation_file else None
    if continue_from is not None:
        method = continued_method(method, continue_from)
    m = normalize_method(method, train_rec.tasks)
    if suffix is not None and (not isinstance(suffix, str) or not suffix or len(suffix) > 40
                               or not all(c.isalnum() or c in "-_." for c in suffix)):
        raise InvalidPrompt(f"suffix expected 1 to 40 letters, digits, '-', '_' or '.', found {suffix!r}")
    seed = int(seed) if seed is not None else 0
    job_id = new_id("ftjob")
    task_id = f"ft-{suffix}-{job_id[6:14]}" if suffix else f"ft-{job_id[6:18]}"
    rec = JobRecord(id=job_id, tenant=tenant, open=open_mode, model=model, training_file=train_rec.id,
                    validation_file=valid_rec.id if valid_rec else None, suffix=suffix, seed=seed, method=m,
                    task_id=task_id, metadata=metadata,
                    init_from=continue_from["key"] if continue_from else None, base_model=base_model)
    validate_job(rec, files.path(train_rec), files.path(valid_rec) if valid_rec else None)
    with jobs.locked():
        active = [j for j in jobs.list(tenant, admin=False) if j.status in ACTIVE]
        if len(active) >= max_active:
            raise QuotaExceeded(f"tenant {tenant!r} has {len(active)} fine-tuning jobs queued or running (limit "
                                f"{max_active}); wait for one to finish or cancel one")
        rec.status = "queued"
        copies = {"train.jsonl": files.path(train_rec)}
        if valid_rec:
            copies["valid.jsonl"] = files.path(valid_rec)
        with tempfile.TemporaryDirectory(dir=jobs.staging) as tmp:
            if continue_from is not None:
                save_file(continue_from["tensors"], str(Path(tmp) / INIT_NAME))
                copies[INIT_NAME] = Path(tmp) / INIT_NAME
            jobs.create(rec, copies)
    jobs.event(rec.id, f"created: {m['type']} {m['task_type']} on {train_rec.filename} ({train_rec.lines} lines)"
                       + (f", validation {valid_rec.filename} ({valid_rec.lines} lines)" if valid_rec else ""))
    return rec


def continued_method(method: dict | None, task: dict) -> dict:
    """The job's method with the continued task's kind, template, labels, task type and size as defaults."""
    kind = task["kind"]
    if kind not in API_METHODS:
        raise InvalidPrompt(f"model {task['key']!r} is a {kind} prompt, which has no trained tensors to continue; "
                            "train from 'default' with its template instead")
    if kind == "p_tuning":
        raise InvalidPrompt(f"model {task['key']!r} is a P-tuning prompt, whose encoder is not stored with the task; "
                            "it cannot be continued (train from 'default')")
    m = dict(method or {"type": kind})
    m.setdefault("type", kind)
    if m["type"] != kind:
        raise InvalidPrompt(f"method.type {m['type']!r} cannot continue model {task['key']!r}, a {kind} prompt")
    opts = dict(m.get(kind) or {})
    opts.setdefault("template", task["template"])
    opts.setdefault("task_type", task["task_type"])
    if task["task_type"] == "classify" and task["labels"]:
        opts.setdefault("labels", {x["name"]: x["verbalizer"] for x in task["labels"]})
    hyper = dict(opts.get("hyperparameters") or {})
    if hyper.get("num_virtual_tokens", task["num_virtual_tokens"]) != task["num_virtual_tokens"]:
        raise InvalidPrompt(f"num_virtual_tokens must stay {task['num_virtual_tokens']} to continue "
                            f"{task['key']!r}, found {hyper['num_virtual_tokens']}")
    hyper["num_virtual_tokens"] = task["num_virtual_tokens"]
    if hyper.get("prefix_projection"):
        raise InvalidPrompt("prefix_projection cannot continue a stored prefix (the MLP is not stored)")
    opts["hyperparameters"] = hyper
    m[kind] = opts
    return m


def cancel_job(jobs: JobStore, job_id: str, tenant: str, admin: bool) -> JobRecord:
    """A queued job is cancelled at once; a running one at its next step (its runner sees the flag)."""
    jobs.get(job_id, tenant, admin)
    state: dict = {}

    def change(r: JobRecord) -> None:
        state["was"] = r.status
        if r.status in ("validating_files", "queued"):
            r.status, r.finished_at = "cancelled", int(time.time())
        elif r.status == "running":
            r.cancel_requested = True
    rec = jobs.update(job_id, change)
    if state["was"] in TERMINAL:
        raise InvalidPrompt(f"job {job_id} already {state['was']}")
    if rec.status == "cancelled":
        jobs.event(job_id, "cancelled")
    else:
        jobs.event(job_id, "cancel requested; the job stops at its next step")
    return rec
