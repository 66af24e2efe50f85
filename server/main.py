"""The FastAPI app: a lifespan that loads the model, opens the store and starts the engine; routers per resource."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from server.api.body_limit import BodyLimit
from server.api.deps import Runtime
from server.api.errors import install_error_handlers
from server.api.limits import TenantLimiter
from server.api.routes import batches, files, fine_tuning, generate, openai, ops, tasks
from server.auth import KeyRing
from server.config import Settings
from server.metrics import HttpMetricsMiddleware, Metrics

log = logging.getLogger("server")


def load_served_model(s: Settings):
    """The frozen model as the settings ask; raises prompt_core.arch.UnsupportedModel with a one-line reason."""
    from prompt_core.model import load_model

    return load_model(s.model, device=s.device, dtype=s.dtype, attn_implementation=s.attn_implementation,
                      quantize=s.quantize, serving=True)


def open_runtime(rt: Runtime) -> None:
    """Blocking start-up work: model, store, engine and the start-up check. `python -m server` runs it before
    uvicorn starts (so a model we cannot serve is refused in one line); the lifespan runs it for other hosts."""
    if rt.engine is not None:
        return
    import torch

    from prompt_core.fingerprint import fingerprint
    from prompt_core.model import load_model
    from prompt_store.archive import limits_for_model
    from prompt_store.peft_io import base_model_name
    from prompt_store.store import PromptStore, StoreConfig
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine import LLMEngine

    s = rt.settings
    t0 = time.monotonic()
    if s.threads:
        torch.set_num_threads(s.threads)
    if rt.loaded is None:
        rt.loaded = load_served_model(s)
    t1 = time.monotonic()
    engine_config = s.engine_config({t: p.weight for t, p in rt.keyring.policies.items()})
    engine = LLMEngine(rt.loaded, engine_config, observer=rt.metrics)
    if s.batch_invariant and not engine.batch_invariant and s.dtype in ("auto", "") \
            and rt.loaded.dtype != torch.float32 \
            and rt.loaded.quantization == "none":
        # auto picks the fastest precision in which requests are batch-invariant: fp32 when bf16 is not
        log.warning("bfloat16 is not batch-invariant on this machine (%s); --dtype auto serves float32",
                    "; ".join(engine.invariance_gaps))
        rt.loaded = load_model(s.model, device=s.device, dtype="float32", attn_implementation=s.attn_implementation,
                               quantize=s.quantize, serving=True)
        engine = LLMEngine(rt.loaded, engine_config, observer=rt.metrics)
    if not engine.batch_invariant:
        log.warning("requests are NOT batch-invariant at this setting (%s): a request's tokens and log-probabilities "
                    "can change with what else is batched; see docs/runbook.md", "; ".join(engine.invariance_gaps))
    rt.metrics.model_info.labels(base_model=s.model, device=rt.loaded.device.type,
                                 dtype=str(rt.loaded.dtype).removeprefix("torch."),
                                 quantization=rt.loaded.quantization,
                                 batch_invariant=str(engine.batch_invariant).lower()).set(1)
    rt.metrics.watch_engine(engine)
    fp = fingerprint(rt.loaded.model)
    limits = limits_for_model(fp, StoreConfig.max_virtual_tokens, max_archive_bytes=s.max_upload_bytes)
    rt.store = PromptStore(s.store, fp, device=rt.loaded.device, dtype=rt.loaded.dtype,
                           config=StoreConfig(max_tasks_per_tenant=s.max_tasks_per_tenant, archive=limits,
                                              base_model=base_model_name(s.model)),
                           poll=True)
    if engine.runner.compiled is not None:  # compile now, not on the first request
        compiled = engine.runner.compiled
        log.info("compiled the decode step in %.1f s", engine.warm_up())
        rt.metrics.decode_compile_seconds.set(compiled.compile_s)
        rt.metrics.decode_eager_steps.set_function(lambda: compiled.eager_steps)
    t2 = time.monotonic()
    if s.self_check:
        from server.engine.self_check import self_check

        worst = self_check(engine, s.self_check_tokens)
        log.info("start-up check: batched logits equal the model's own forward (max relative difference %.1e)%s",
                 worst, ", and each probe alone bit for bit" if engine.batch_invariant else "")
    rt.store.check_generation = lambda generation: check_generation(engine, generation)
    rt.engine = AsyncEngine(engine, max_queue=s.max_queue)
    rt.engine.start()
    rt.startup = {"imports_s": t0 - rt.launched_at if rt.launched_at is not None else None, "model_s": t1 - t0,
                  "store_and_engine_s": t2 - t1, "check_s": time.monotonic() - t2,
                  "since": rt.launched_at if rt.launched_at is not None else t0}
    from server.batches.service import open_batches
    from server.training_service import open_fine_tuning

    open_fine_tuning(rt)
    open_batches(rt)


def check_generation(engine, generation: dict) -> None:
    """A task version's generation defaults, on upload: its response_format must compile with the serving
    tokenizer (a 422 naming the problem otherwise; the compiled grammar stays cached for the task's requests)."""
    from server.api.schemas.sampling import constraint_of

    constraint = constraint_of(generation.get("response_format"))
    if constraint is not None:
        engine.grammars.compile(constraint)


@asynccontextmanager
async def lifespan(app: FastAPI):
    rt: Runtime = app.state.runtime
    await run_in_threadpool(open_runtime, rt)
    st = rt.startup
    imports = f"imports and app {st['imports_s']:.1f} s, " if st.get("imports_s") is not None else ""
    log.info("ready in %.1f s (%smodel %.1f s, fingerprint, store and engine %.1f s, start-up check %.1f s): "
             "model %s on %s, store %s", time.monotonic() - st["since"], imports, st["model_s"],
             st["store_and_engine_s"], st["check_s"], rt.settings.model, rt.loaded.device, rt.settings.store)
    try:
        yield
    finally:
        rt.draining = True
        if rt.batch_runner is not None:  # lines in flight are cancelled; the batch resumes wherever it is claimed
            await run_in_threadpool(rt.batch_runner.stop)
        if rt.runner is not None:  # checkpoints the running job and puts it back in the queue
            await run_in_threadpool(rt.runner.stop)
        if rt.engine is not None:  # uvicorn already waited up to the grace period for open requests
            await rt.engine.shutdown(grace_s=0)
        if rt.store is not None and hasattr(rt.store, "close"):
            rt.store.close()


def _tiers(rt: Runtime) -> dict:
    """The store's disk/host/device tiers."""
    return dict(rt.store.stats()["tiers"]) if rt.store is not None else {}


def create_app(settings: Settings | None = None, launched_at: float | None = None) -> FastAPI:
    """`launched_at`: time.monotonic() when the process started, for the start-up breakdown in the ready log."""
    settings = settings or Settings()
    keyring = KeyRing.load(settings.auth_file) if settings.auth_file else KeyRing.open_ring()
    metrics = Metrics(tier_stats=lambda: _tiers(rt))
    rt = Runtime(settings=settings, keyring=keyring, metrics=metrics, launched_at=launched_at,
                 limiter=TenantLimiter(keyring, settings.max_concurrent, settings.tokens_per_minute,
                                         settings.max_queue))
    app = FastAPI(title="promptserve", version="0.1.0", lifespan=lifespan,
                  description="One frozen causal LM serving many task prompts (hard, prompt tuning, P-tuning, "
                              "prefix tuning) batched together. See docs/api.md.")
    app.state.runtime = rt
    install_error_handlers(app)
    rt.app = app
    for module in (tasks, generate, openai, ops, files, fine_tuning, batches):
        app.include_router(module.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics_of=lambda: rt.metrics)
    return app
