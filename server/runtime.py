"""The server's runtime: everything one server instance holds, how it starts and how it stops.

`Runtime.create(settings)` makes it with what costs nothing (settings, API keys, metrics, admission); `open()` does
the blocking start-up: the model, the store, the engine and its start-up check, then fine-tuning and batches
(server/training_service.py, server/batches/service.py), each of which hands back what it opened; `close()` stops
them in reverse. `python -m server` and `python -m server.batch_worker` call `open()` before serving (a model we
cannot serve is refused in one line); the app's lifespan (server/main.py) calls it for other hosts, and `close()`.

Routes receive the runtime through `server.api.deps.RuntimeDep` and read the engine through what it exposes here
(`compiled`, `batch_invariant`, `ready_info()`), never the engine's insides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from server.api.limits import TenantLimiter, WorkInFlight
from server.auth import KeyRing
from server.config import Settings
from server.metrics import Metrics

if TYPE_CHECKING:  # the heavy imports (torch) wait for open()
    from starlette.types import ASGIApp

    from prompt_core.model import LoadedModel
    from prompt_store.store import PromptStore
    from server.batches import BatchRunner, BatchStore
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine import LLMEngine
    from training.files import FileStore
    from training.jobs import JobRunner, JobStore

log = logging.getLogger("server")


@dataclass
class Runtime:
    """Everything one server instance holds; `draining` is set on SIGTERM so new work is refused at once."""
    settings: Settings
    keyring: KeyRing
    metrics: Metrics
    limiter: TenantLimiter
    loaded: LoadedModel | None = None
    store: PromptStore | None = None
    engine: AsyncEngine | None = None
    files: FileStore | None = None            # uploaded files (server/training_service.py)
    jobs: JobStore | None = None              # fine-tuning job records
    job_runner: JobRunner | None = None       # the thread that trains jobs, when this process trains
    batches: BatchStore | None = None         # batch records (server/batches/service.py)
    batch_runner: BatchRunner | None = None   # the thread that runs batches, when this process runs them
    app: ASGIApp | None = None                # the ASGI app itself: a batch's lines run through it in-process
    work: WorkInFlight = field(default_factory=WorkInFlight)
    training_stats: dict = field(default_factory=lambda: {"tokens": 0.0, "tokens_per_s": 0.0})  # this process's
    draining: bool = False
    started_at: float = field(default_factory=time.time)
    launched_at: float | None = None    # time.monotonic() at process start (python -m server), else None
    startup: dict = field(default_factory=dict)  # seconds per start-up phase, for the ready log

    @classmethod
    def create(cls, settings: Settings, launched_at: float | None = None) -> Runtime:
        """Keys (a bad auth file is a ValueError), metrics and admission; nothing is loaded yet."""
        keyring = KeyRing.load(settings.auth_file) if settings.auth_file else KeyRing.open_ring()
        metrics = Metrics(tier_stats=lambda: rt.tier_stats())
        rt = cls(settings=settings, keyring=keyring, metrics=metrics, launched_at=launched_at,
                 limiter=TenantLimiter(keyring, settings.max_concurrent, settings.tokens_per_minute,
                                       settings.max_queue))
        return rt

    # ---- start-up and shutdown

    def open(self) -> None:
        """Blocking start-up work: model, store, engine and the start-up check, then fine-tuning and batches.
        Raises prompt_core.arch.UnsupportedModel with a one-line reason for a model we cannot serve."""
        if self.engine is not None:
            return
        import torch

        from prompt_core.fingerprint import fingerprint
        from prompt_core.model import load_model
        from prompt_store.archive import limits_for_model
        from prompt_store.peft_io import base_model_name
        from prompt_store.store import PromptStore, StoreConfig
        from server.engine.async_engine import AsyncEngine
        from server.engine.engine import LLMEngine

        s = self.settings
        t0 = time.monotonic()
        if s.threads:
            torch.set_num_threads(s.threads)
        if self.loaded is None:
            self.loaded = load_served_model(s)
        t1 = time.monotonic()
        engine_config = s.engine_config({t: p.weight for t, p in self.keyring.policies.items()})
        engine = LLMEngine(self.loaded, engine_config, observer=self.metrics)
        if s.batch_invariant and not engine.batch_invariant and s.dtype in ("auto", "") \
                and self.loaded.dtype != torch.float32 \
                and self.loaded.quantization == "none":
            # auto picks the fastest precision in which requests are batch-invariant: fp32 when bf16 is not
            log.warning("bfloat16 is not batch-invariant on this machine (%s); --dtype auto serves float32",
                        "; ".join(engine.invariance_gaps))
            self.loaded = load_model(s.model, device=s.device, dtype="float32",
                                     attn_implementation=s.attn_implementation, quantize=s.quantize, serving=True)
            engine = LLMEngine(self.loaded, engine_config, observer=self.metrics)
        if not engine.batch_invariant:
            log.warning("requests are NOT batch-invariant at this setting (%s): a request's tokens and "
                        "log-probabilities can change with what else is batched; see docs/runbook.md",
                        "; ".join(engine.invariance_gaps))
        self.metrics.model_info.labels(base_model=s.model, device=self.loaded.device.type,
                                       dtype=str(self.loaded.dtype).removeprefix("torch."),
                                       quantization=self.loaded.quantization,
                                       batch_invariant=str(engine.batch_invariant).lower()).set(1)
        self.metrics.watch_engine(engine)
        fp = fingerprint(self.loaded.model)
        limits = limits_for_model(fp, StoreConfig.max_virtual_tokens, max_archive_bytes=s.max_upload_bytes)
        self.store = PromptStore(s.store, fp, device=self.loaded.device, dtype=self.loaded.dtype,
                                 config=StoreConfig(max_tasks_per_tenant=s.max_tasks_per_tenant, archive=limits,
                                                    base_model=base_model_name(s.model)),
                                 poll=True, check_generation=partial(check_generation, engine))
        log.info("warm-up: the largest step the limits allow took %.1f s", engine.warm_up())
        t2 = time.monotonic()
        if s.self_check:
            from server.engine.self_check import self_check

            worst = self_check(engine, s.self_check_tokens)
            log.info("start-up check: batched logits equal the model's own forward (max relative difference %.1e)%s",
                     worst, ", and each probe alone bit for bit" if engine.batch_invariant else "")
        self.engine = AsyncEngine(engine, max_queue=s.max_queue)
        self.engine.start()
        launched = self.launched_at
        self.startup = {"imports_s": t0 - launched if launched is not None else None, "model_s": t1 - t0,
                        "store_and_engine_s": t2 - t1, "check_s": time.monotonic() - t2,
                        "since": launched if launched is not None else t0}
        from server.batches.service import open_batches
        from server.training_service import open_fine_tuning

        self.files, self.jobs, self.job_runner = open_fine_tuning(
            s, loaded=self.loaded, store=self.store, metrics=self.metrics, stats=self.training_stats,
            engine=lambda: self.engine)
        self.batches, self.batch_runner = open_batches(
            s, store=self.store, files=self.files, app=self.app, work=self.work, limiter=self.limiter,
            metrics=self.metrics, engine=lambda: self.engine)
        self.metrics.batch_counts = self.batches.counts

    def log_ready(self) -> None:
        """The ready log line: where start-up time went (docs/runbook.md)."""
        st = self.startup
        imports = f"imports and app {st['imports_s']:.1f} s, " if st.get("imports_s") is not None else ""
        log.info("ready in %.1f s (%smodel %.1f s, fingerprint, store and engine %.1f s, start-up check %.1f s): "
                 "model %s on %s, store %s", time.monotonic() - st["since"], imports, st["model_s"],
                 st["store_and_engine_s"], st["check_s"], self.settings.model, self.loaded.device, self.settings.store)

    async def close(self) -> None:
        """Stop in reverse: batches (lines in flight are cancelled; the batch resumes wherever it is claimed), the
        training job (checkpointed and queued again), the engine (uvicorn already waited up to the grace period for
        open requests), the store."""
        self.draining = True
        if self.batch_runner is not None:
            await run_in_threadpool(self.batch_runner.stop)
        if self.job_runner is not None:
            await run_in_threadpool(self.job_runner.stop)
        if self.engine is not None:
            await self.engine.shutdown(grace_s=0)
        if self.store is not None and hasattr(self.store, "close"):
            self.store.close()

    # ---- what routes and metrics read

    @property
    def _llm(self) -> LLMEngine:
        """The engine the loop thread drives (read here for its settings; requests go through `engine`)."""
        return self.engine.engine

    @property
    def compiled(self) -> bool:
        """The decode step runs compiled (--compile)."""
        return self._llm.compiled is not None

    @property
    def batch_invariant(self) -> bool:
        """Every request's tokens and log-probabilities are the same whatever else is batched."""
        return self._llm.batch_invariant

    def ready_info(self) -> dict:
        """What /ready reports of a running server: the model as served and the engine's fixed settings."""
        lm, llm = self.loaded, self._llm
        return {"model": self.settings.model, "device": lm.device.type, "dtype": str(lm.dtype).removeprefix("torch."),
                "quantization": lm.quantization, "compiled": self.compiled, "batch_invariant": self.batch_invariant,
                "kv_cache_bytes": llm.cache.bytes(), "kv_block_size": llm.blocks.block_size}

    def tier_stats(self) -> dict:
        """The store's disk/host/device tiers (empty until it opens)."""
        return dict(self.store.stats()["tiers"]) if self.store is not None else {}


def load_served_model(s: Settings) -> LoadedModel:
    """The frozen model as the settings ask; raises prompt_core.arch.UnsupportedModel with a one-line reason."""
    from prompt_core.model import load_model

    return load_model(s.model, device=s.device, dtype=s.dtype, attn_implementation=s.attn_implementation,
                      quantize=s.quantize, serving=True)


def check_generation(engine: LLMEngine, generation: dict) -> None:
    """A task version's generation defaults, on upload: its response_format must compile with the serving
    tokenizer (a 422 naming the problem otherwise; the compiled grammar stays cached for the task's requests)."""
    from server.api.schemas.sampling import constraint_of

    constraint = constraint_of(generation.get("response_format"))
    if constraint is not None:
        engine.grammars.compile(constraint)
