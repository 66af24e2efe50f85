"""Task resources: a task's upload metadata and hard-prompt body, its generation defaults, and a task as clients
see it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .common import MAX_STOP, ResponseFormat, StopStr, Strict

Visibility = Literal["private", "public"]
TaskType = Literal["generate", "classify"]
Labels = list[Annotated[str, Field(min_length=1, max_length=128)]] | dict[str, Annotated[str, Field(min_length=1)]]


class GenerationDefaults(Strict):
    """A task's defaults for generate requests that leave these fields out."""
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, lt=2**63)
    stop: list[StopStr] | None = Field(None, max_length=MAX_STOP)
    response_format: ResponseFormat | None = Field(
        None, description="the task's output constraint, applied to every generate, completion and chat request "
                          "that does not send its own; compiled at upload, so a schema that cannot be is a 422")


class TaskMetadata(Strict):
    """The optional `metadata` part of an upload (JSON text). Fields left out come from the adapter, if it has them."""
    task_type: TaskType | None = None
    labels: Labels | None = Field(None, max_length=256)
    template: str | None = Field(None, max_length=20_000, description="must hold exactly one {input}")
    description: str | None = Field(None, max_length=4_000)
    visibility: Visibility | None = None
    generation: GenerationDefaults | None = None


class HardTaskCreate(Strict):
    """JSON body of POST /v1/tasks for a hard prompt (no tensors)."""
    task_id: str = Field(min_length=1, max_length=128, examples=["sentiment"])
    kind: Literal["hard"] = "hard"
    template: str = Field(max_length=20_000, examples=["Review: {input}\nSentiment:"])
    task_type: TaskType | None = None
    labels: Labels | None = Field(None, max_length=256)
    description: str = Field("", max_length=4_000)
    visibility: Visibility = "private"
    generation: GenerationDefaults | None = None


class LabelPublic(BaseModel):
    name: str
    verbalizer: str


class TaskPublic(BaseModel):
    """A task version as clients see it."""
    id: str
    version: int
    kind: str
    num_virtual_tokens: int
    sha256: str | None = Field(description="sha256 of the tensor file; null for hard prompts")
    task_type: TaskType
    labels: list[LabelPublic]
    template: str
    description: str
    visibility: Visibility
    owner: str
    generation: dict[str, Any]
    created_at: str


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskPublic]
