"""Health and readiness probes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready", "draining"]
    model: str | None = None
    tasks: int | None = None
    detail: str | None = None
