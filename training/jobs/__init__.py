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

Files (each one job):
    records.py   JobRecord, the states, the file names in a job's directory, ids
    store.py     JobStore: records, events, claiming under a lease (fcntl lock shared by processes)
    method.py    what a request means: the method with defaults, the TrainConfig, checks before queuing
    actions.py   what the API does: create_job, cancel_job, publish_task (a finished job's prompt becomes a task)
    runner.py    JobRunner: the thread that claims and trains jobs, renews their leases, records outcomes
    control.py   JobControl, the training loop's hooks for one job (gate, cancel, checkpoints, events, ETA), and
                 what a runner hands it: RunnerConfig, Gate, RunnerSignals (stop, cancelled, lost; the runner owns
                 them, the control only reads them, so neither file imports the other's internals)
This file is the index: import from `training.jobs`.
"""

from __future__ import annotations

from .actions import cancel_job, create_job, publish_task
from .control import Gate, JobCancelled, JobControl, RunnerConfig, RunnerSignals
from .method import continued_method, describe, normalize_method, train_config, validate_job
from .records import (
    ACTIVE,
    API_METHODS,
    EVENTS_NAME,
    HYPER,
    INIT_NAME,
    JOB_NAME,
    RUN_DIR,
    TERMINAL,
    JobNotFound,
    JobRecord,
    metric_name,
    new_id,
)
from .runner import JobRunner
from .store import JobStore, orphaned

__all__ = [
    "ACTIVE", "API_METHODS", "EVENTS_NAME", "HYPER", "INIT_NAME", "JOB_NAME", "RUN_DIR", "TERMINAL",
    "Gate", "JobCancelled", "JobControl", "JobNotFound", "JobRecord", "JobRunner", "JobStore", "RunnerConfig",
    "RunnerSignals",
    "cancel_job", "continued_method", "create_job", "describe", "metric_name", "new_id", "normalize_method",
    "orphaned", "publish_task", "train_config", "validate_job",
]
