"""The fine-tuning job routes (OpenAI's /v1/fine_tuning/jobs), in OpenAI's field names so its clients work
unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobCreate(BaseModel):
    """`method` is {"type": "prompt_tuning" | "p_tuning" | "prefix_tuning", "<type>": {"hyperparameters": {...},
    "task_type", "labels", "template"}} (docs/api.md); `hyperparameters` (OpenAI's older top-level field) takes
    n_epochs, batch_size and learning_rate_multiplier (times the method's default rate)."""
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=140, description="'default' (the server's model), or a task id to continue from")
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, max_length=40)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = Field(None, max_length=0, description="not supported; must be empty")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Job(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    result_files: list[str] = []
    trained_tokens: int | None
    estimated_finish: int | None
    error: JobError | None
    user_provided_suffix: str | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    step: int = Field(description="optimizer steps done")
    total_steps: int
    result: dict[str, Any] | None = Field(description="the training results (best epoch and score, history, "
                                                       "time) once it succeeded")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] = {}
    type: str = "message"


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
