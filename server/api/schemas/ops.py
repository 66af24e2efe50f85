"""Health and readiness probes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready", "draining"]
    model: str | None = None
    device: str | None = None
    dtype: str | None = None         # what the model runs in (what `--dtype auto` chose, if auto)
    quantization: str | None = None  # none, int8 or int4
    compiled: bool | None = None     # the decode step runs compiled (--compile)
    batch_invariant: bool | None = None  # every request's tokens and logprobs are the same whatever is batched
    kv_cache_bytes: int | None = None    # the key/value cache's budget, allocated at start
    kv_block_size: int | None = None     # slots per block
    tasks: int | None = None
    detail: str | None = None
