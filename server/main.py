"""The FastAPI app: routers per resource, the error handlers, the middleware, and a lifespan that opens and closes
the runtime (server/runtime.py: the model, store, engine and workers)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from server.api.body_limit import BodyLimit
from server.api.errors import install_error_handlers
from server.api.routes import batches, files, fine_tuning, generate, openai, ops, tasks
from server.config import Settings
from server.metrics import HttpMetricsMiddleware
from server.runtime import Runtime


@asynccontextmanager
async def lifespan(app: FastAPI):
    rt: Runtime = app.state.runtime
    await run_in_threadpool(rt.open)  # at once if `python -m server` opened it already
    rt.log_ready()
    try:
        yield
    finally:
        await rt.close()


def create_app(settings: Settings | None = None, launched_at: float | None = None) -> FastAPI:
    """`launched_at`: time.monotonic() when the process started, for the start-up breakdown in the ready log."""
    settings = settings or Settings()
    rt = Runtime.create(settings, launched_at)
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
