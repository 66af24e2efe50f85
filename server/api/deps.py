"""What routes receive, as dependency aliases: `RuntimeDep` (the server's runtime, server/runtime.py), `TenantDep`
(the caller), `EngineDep` and `StoreDep` (503 while they are not running); and the guards a route calls for the
stores that open later (files, jobs, batches). Routes never reach for globals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prompt_store.store import PromptStore
from server.auth import BATCH_CALLER, OPEN_TENANT, Principal
from server.engine.async_engine import AsyncEngine
from server.runtime import Runtime

from .errors import ApiError, unauthorized

if TYPE_CHECKING:
    from server.batches import BatchStore
    from training.files import FileStore
    from training.jobs import JobStore


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
