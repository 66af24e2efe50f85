"""A job's record (OpenAI's fields and states, plus the lease) and the names of the files in its directory."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from prompt_store.errors import TaskNotFound

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

