"""Probes and metrics: no key needed, so load balancers, Kubernetes and Prometheus reach them."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import RuntimeDep
from ..errors import documented
from ..schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """Alive: the process answers. Says nothing about the model (that is /ready)."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
def ready(rt: RuntimeDep) -> Response:
    """200 once the model is loaded and the engine loop runs; 503 while starting, draining, or if the loop died."""
    if rt.draining:
        body, status = Readiness(status="draining", detail="shutting down"), 503
    elif rt.engine is None or rt.store is None:
        body, status = Readiness(status="not_ready", detail="loading the model"), 503
    elif not rt.engine.ready:
        body, status = Readiness(status="not_ready", detail="the engine loop is not running"), 503
    else:
        body, status = Readiness(status="ready", **rt.ready_info()), 200
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}},
                                                            **documented(500)})
def metrics(rt: RuntimeDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)
