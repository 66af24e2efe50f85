"""What routes receive: the caller's tenant, the engine, the store and the server's runtime state.

`Runtime` is created by `server.main.create_app` and filled in by its lifespan; routes never reach for globals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prompt_core.model import LoadedModel
from prompt_store.store import PromptStore
from server.auth import BATCH_CALLER, OPEN_TENANT, KeyRing, Principal
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.metrics import Metrics

from .errors import ApiError, unauthorized
from .limits import TenantLimiter, WorkInFlight

if TYPE_CHECKING:
    from server.batches import BatchStore
    from training.files import FileStore
    from training.jobs import JobStore


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
    files: object = None      # training.files.FileStore, once started (server/training_service.py)
    jobs: object = None       # training.jobs.JobStore
    runner: object = None     # training.jobs.JobRunner, when this process trains
    batches: object = None    # server.batches.BatchStore, once started (server/batches/service.py)
    batch_runner: object = None  # server.batches.BatchRunner, when this process runs batches
    app: object = None        # the ASGI app itself: a batch's lines run through it in-process
    work: WorkInFlight = field(default_factory=WorkInFlight)
    training_stats: dict = field(default_factory=dict)
    draining: bool = False
    started_at: float = field(default_factory=time.time)
    launched_at: float | None = None    # time.monotonic() at process start (python -m server), else None
    startup: dict = field(default_factory=dict)  # seconds per start-up phase, for the ready log


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_bearer = HTTPBearer(auto_error=False, description="an API key from the auth file")


def get_principal(request: Request, rt: RuntimeDep,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The caller. Without an auth file everyone is the one open tenant (as admin, since there is no one else). A
    batch's line run in-process carries the batch's principal in its ASGI scope, which no header can set."""
    inside = request.scope.get(BATCH_CALLER)
    if isinstance(inside, Principal):
        return inside
    if rt.keyring.open:
        return Principal(tenant=OPEN_TENANT, admin=True, open=True)
    if creds is None or not creds.credentials:
        raise unauthorized("missing API key: send Authorization: Bearer <key>")
    principal = rt.keyring.authenticate(creds.credentials)
    if principal is None:
        raise unauthorized("invalid API key")
    return principal


def get_engine(rt: RuntimeDep) -> AsyncEngine:
    if rt.draining:
        raise ApiError(503, "unavailable", "the server is shutting down", {"Retry-After": "1", "Connection": "close"})
    if rt.engine is None or not rt.engine.ready:
        raise ApiError(503, "unavailable", "the engine is not running", {"Retry-After": "1"})
    return rt.engine


def get_store(rt: RuntimeDep) -> PromptStore:
    return _opened(rt.store, "the prompt store")


def file_store(rt: Runtime) -> FileStore:
    """Called in a route's body (after its own checks), not as a dependency: 503 until the runtime has opened it."""
    return _opened(rt.files, "the file store")


def job_store(rt: Runtime) -> JobStore:
    return _opened(rt.jobs, "the job store")


def batch_store(rt: Runtime) -> BatchStore:
    return _opened(rt.batches, "the batch store")


def _opened(part, what: str):
    if part is None:
        raise ApiError(503, "unavailable", f"{what} is not open", {"Retry-After": "1"})
    return part


TenantDep = Annotated[Principal, Depends(get_principal)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
StoreDep = Annotated[PromptStore, Depends(get_store)]
