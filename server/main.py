"""The FastAPI app: a lifespan that loads the model, opens the store and starts the engine; routers per resource."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from server.api.body_limit import BodyLimit
from server.api.deps import Runtime
from server.api.errors import install_error_handlers
from server.api.limits import TenantLimiter
from server.api.routes import files, fine_tuning, generate, openai, ops, tasks
from server.auth import KeyRing
from server.config import Settings
from server.metrics import HttpMetricsMiddleware, Metrics

log = logging.getLogger("server")


def _open(rt: Runtime) -> None:
    """Blocking start-up work, off the event loop: model, store, engine."""
    from prompt_core.fingerprint import fingerprint
    from prompt_core.model import load_model
    from prompt_store.archive import ArchiveLimits
    from prompt_store.store import PromptStore, StoreConfig
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine import EngineConfig, LLMEngine

    s = rt.settings
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    rt.loaded = load_model(s.model, device=s.device, dtype=s.dtype)
    limits = ArchiveLimits(max_archive_bytes=s.max_upload_bytes)
    rt.store = PromptStore(s.store, fingerprint(rt.loaded.model), device=rt.loaded.device, dtype=rt.loaded.dtype,
                           config=StoreConfig(max_tasks_per_tenant=s.max_tasks_per_tenant, archive=limits,
                                              base_model=s.model),
                           poll=True)
    weights = {t: p.weight for t, p in rt.keyring.policies.items()}
    engine = LLMEngine(rt.loaded, EngineConfig(max_batch_size=s.max_batch_size, max_prefill_tokens=s.max_prefill_tokens,
                                               max_input_tokens=s.max_input_tokens, max_new_tokens=s.max_new_tokens,
                                               tenant_weights=weights, head_cache_bytes=s.head_cache_mb << 20),
                       observer=rt.metrics)
    rt.engine = AsyncEngine(engine, max_queue=s.max_queue)
    rt.engine.start()
    from server.fine_tuning import open_fine_tuning

    open_fine_tuning(rt)


@asynccontextmanager
async def lifespan(app: FastAPI):
    rt: Runtime = app.state.runtime
    await run_in_threadpool(_open, rt)
    log.info("ready: model %s on %s, store %s", rt.settings.model, rt.loaded.device, rt.settings.store)
    try:
        yield
    finally:
        rt.draining = True
        if rt.runner is not None:  # checkpoints the running job and puts it back in the queue
            await run_in_threadpool(rt.runner.stop)
        if rt.engine is not None:  # uvicorn already waited up to the grace period for open requests
            await rt.engine.shutdown(grace_s=0)
        if rt.store is not None and hasattr(rt.store, "close"):
            rt.store.close()


def _tiers(rt: Runtime) -> dict:
    """The store's disk/host/device tiers, and the engine's cache of prompt heads as tier "head"."""
    tiers = dict(rt.store.stats()["tiers"]) if rt.store is not None else {}
    if rt.engine is not None:
        tiers["head"] = rt.engine.engine.runner.heads.stats()
    return tiers


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keyring = KeyRing.load(settings.auth_file) if settings.auth_file else KeyRing.open_ring()
    metrics = Metrics(tier_stats=lambda: _tiers(rt))
    rt = Runtime(settings=settings, keyring=keyring, metrics=metrics,
                 limiter=TenantLimiter(keyring, settings.max_concurrent, settings.tokens_per_minute))
    app = FastAPI(title="promptserve", version="0.1.0", lifespan=lifespan,
                  description="One frozen causal LM serving many task prompts (hard, prompt tuning, P-tuning, "
                              "prefix tuning) batched together. See docs/api.md.")
    app.state.runtime = rt
    install_error_handlers(app)
    for module in (tasks, generate, openai, ops, files, fine_tuning):
        app.include_router(module.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics_of=lambda: rt.metrics)
    return app
