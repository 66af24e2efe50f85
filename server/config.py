"""Deployment settings: every option is a `python -m server --flag` and a `PROMPTSERVE_<NAME>` environment variable.

Read once, when the server starts (never at import), so tests build servers with their own settings.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import TypeAliasType

from server.engine.config import EngineConfig, SchedulerConfig, batch_rows

# named so that `--help` shows `--auth-file PATH` rather than the union's parts
PATH = TypeAliasType("PATH", Path | None)

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


class Settings(BaseSettings):
    """Command-line flags win over the environment, which wins over these defaults."""

    model_config = SettingsConfigDict(env_prefix="PROMPTSERVE_", cli_kebab_case=True, cli_implicit_flags=True,
                                      cli_prog_name="python -m server", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 picks a free one)")
    model: str = Field("default", description="'default' (the embedded SmolLM2-135M-Instruct), a directory or a hub id")
    store: Path = Field(Path("./data/store"), description="prompt store directory (shared by replicas)")
    auth_file: PATH = Field(None, description="JSON file of API keys; without it the server is one open tenant")
    serve_base_model: bool = Field(True, description="serve the bare model (no task prompt) as the OpenAI model "
                                                     "'default'; off: only tasks are models")
    allow_insecure_bind: bool = Field(False, description="allow a non-loopback host without an auth file")
    device: str = Field("auto", description="auto (cuda, mps, cpu), or a torch device such as cuda:1")
    dtype: str = Field("auto", description="auto (bf16 on GPU and on CPUs with native bf16, else fp32), float32, "
                                           "bfloat16 or float16")
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="CPU only: int8 (int8 weights and activations, fastest from ~8 rows up) or int4 "
                            "(4-bit weights, fastest at batch 1); none serves the weights in --dtype. A quantized "
                            "server does not train: fine-tuning jobs wait for a training worker")
    compile: bool = Field(False, description="not available with the paged key/value cache: the server refuses it "
                                             "(the compiled decode step of the slot cache is gone; see "
                                             "docs/benchmarks.md)")
    attn_implementation: str = Field("auto", description="auto (sdpa, or eager where the model needs it, e.g. "
                                                         "attention softcapping), sdpa or eager")
    self_check: bool = Field(True, description="at start, compare the engine's batched logits with the model's own "
                                               "forward on probe requests and refuse to serve a model that differs")
    self_check_tokens: int = Field(256, ge=8, description="longest probe request of the start-up check")

    # the engine's limits: defaults and validation are engine/config.py's (see engine_config)
    max_batch_size: int = Field(SchedulerConfig.max_batch_size, description="rows in one engine step")
    max_prefill_tokens: int = Field(SchedulerConfig.max_prefill_tokens, description="tokens one engine step computes: "
                                    "one per decoding row, then chunks of prompts (a longer prompt is split over "
                                    "steps)")
    max_input_tokens: int = Field(EngineConfig.max_input_tokens, description="longest accepted input, task prompt "
                                                                             "included (413 above)")
    max_new_tokens: int = Field(EngineConfig.max_new_tokens, description="most tokens one request may generate (413 "
                                                                         "above)")
    max_logprobs: int = Field(EngineConfig.max_logprobs, description="most alternatives per token that logprobs / "
                                                                     "top_logprobs may ask for (a larger N is a 422)")
    kv_cache_mb: int = Field(EngineConfig.kv_cache_bytes >> 20, ge=0, description="the key/value cache's budget in "
                             "MiB, allocated once at start; 0: 2048 on a CPU (no more than --max-batch-size x "
                             "(--max-input-tokens + --max-new-tokens) tokens can use), 0.8 of the free memory on a GPU")
    batch_invariant: bool = Field(EngineConfig.batch_invariant, description="run the linear layers in fixed row "
                                  "tiles so every request's tokens and log-probabilities are the same bits whatever "
                                  "else is batched (off: torch's own matmul shapes, a few percent faster at batch 64, "
                                  "and answers that change with the load; a warning at start)")
    kv_block_size: int = Field(EngineConfig.kv_block_size, description="key/value slots per cache block (a multiple "
                                                                       "of 16)")
    prefix_caching: bool = Field(EngineConfig.prefix_caching, description="share cached key/value blocks of "
                                 "identical prompt prefixes between requests of one task (the task's static head, "
                                 "a tenant's repeated system prompt or conversation)")
    max_queue: int = Field(1024, ge=1, description="engine requests in flight (running or waiting), all tenants "
                                                  "together (503 above)")

    max_concurrent: int = Field(64, ge=1, description="requests in flight each tenant is guaranteed; past it a tenant "
                                "is admitted while the queue has room beyond a quarter of --max-queue (429 "
                                "otherwise); a tenant's own max_concurrent in the auth file is a hard limit")
    tokens_per_minute: int = Field(0, ge=0, description="tokens in+out per tenant per minute, 0 for no limit (429)")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest upload body (413 above)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest request body that is not an upload, "
                                                                   "e.g. a JSON generate or classify (413 above)")
    max_tasks_per_tenant: int = Field(1000, ge=1, description="tasks one tenant may own (429 above)")

    max_file_bytes: int = Field(32 * 1024 * 1024, ge=1, description="largest fine-tuning file upload (413 above)")
    max_file_bytes_per_tenant: int = Field(256 * 1024 * 1024, ge=1, description="fine-tuning file bytes one tenant "
                                                                               "may store (429 above)")
    max_jobs_per_tenant: int = Field(4, ge=1, description="fine-tuning jobs one tenant may have queued or running "
                                                         "(429 above)")
    training_runner: bool = Field(True, description="train queued fine-tuning jobs in this process, on the "
                                                    "resident model (off: leave them to `python -m training worker`)")
    training_share: float = Field(0.25, ge=0.0, le=1.0, description="while requests are in flight, the share of "
                                  "time training steps may take (0: train only when the engine is idle)")
    training_micro_batch: int = Field(2, ge=0, description="rows per forward/backward of a training step; serving "
                                                          "waits for at most one of them (0: the whole batch)")
    training_checkpoint_s: float = Field(30.0, gt=0, description="checkpoint a running job at least this often, "
                                                                 "besides every epoch end")

    batch_runner: bool = Field(True, description="run queued batches (/v1/batches) in this process, on the resident "
                                                 "model (off: leave them to `python -m server.batch_worker` or "
                                                 "other replicas)")
    batch_share: float = Field(0.0, ge=0.0, le=1.0, description="while interactive requests run or wait, the share "
                               "of --max-batch-size rows that batch lines may use in a step; the others pause in "
                               "place (0: batch rows run only when no interactive request does, and a step of them "
                               "stops at its next layer when one arrives); an idle engine gives batches full "
                               "capacity. On a CPU every extra row in a step slows the interactive ones")
    batch_max_in_flight: int = Field(16, ge=1, description="batch lines in flight in this process, all batches "
                                                           "together (memory is bounded by this, not by file sizes)")
    max_batches_per_tenant: int = Field(4, ge=1, description="batches one tenant may have queued or running (429 "
                                                            "above)")
    max_batch_lines: int = Field(50_000, ge=1, description="requests in one batch's input file (429 above)")

    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM: time for in-flight requests to finish")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; empty turns CORS off")
    log_requests: bool = Field(False, description="log request texts (never tensors); off by default for privacy")
    log_level: str = Field("info", description="debug, info, warning or error")
    threads: int = Field(0, ge=0, description="torch CPU threads for the engine; 0 keeps torch's default (one per "
                                               "core). 1 avoids thrashing when other processes share the cores")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError(f"expected debug, info, warning, error or critical, found {v!r}")
        return v

    @model_validator(mode="after")
    def _engine_limits(self) -> Settings:
        self.engine_config()  # refuses bad limits now, with the engine's own rule, not when the engine starts
        return self

    def engine_config(self, tenant_weights: dict[str, float] | None = None) -> EngineConfig:
        """The engine's limits, field by field (tenant weights come from the auth file, not from settings)."""
        return EngineConfig(scheduler=SchedulerConfig(max_batch_size=self.max_batch_size,
                                                      max_prefill_tokens=self.max_prefill_tokens,
                                                      tenant_weights=dict(tenant_weights or {}),
                                                      batch_rows=batch_rows(self.batch_share, self.max_batch_size)),
                            max_input_tokens=self.max_input_tokens, max_new_tokens=self.max_new_tokens,
                            kv_cache_bytes=self.kv_cache_mb << 20, kv_block_size=self.kv_block_size,
                            prefix_caching=self.prefix_caching, batch_invariant=self.batch_invariant,
                            max_logprobs=self.max_logprobs,
                            compile_decode=self.compile)

    def check_bind(self) -> None:
        """Without keys, anyone who can reach the port owns every task: refuse that beyond loopback unless asked."""
        if self.auth_file is None and not self.allow_insecure_bind and not is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host!r} without an auth file: anyone who reaches it could use and delete "
                "every task. Pass --auth-file PATH, or --allow-insecure-bind (PROMPTSERVE_ALLOW_INSECURE_BIND=1) "
                "if the network in front of it is trusted.")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
