"""Batches (OpenAI's /v1/batches): create, retrieve, list, cancel; private to the tenant.

A batch runs a file of requests (purpose `batch`) on the resident model from idle capacity (server/batches/): its
lines go through the live routes in-process, so each answer is what the route would have given, and the output and
error files are downloaded with GET /v1/files/{id}/content. Another tenant's batch is a 404; an admin sees every
batch.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from prompt_store.errors import InvalidPrompt
from server.batches import TERMINAL, BatchRecord
from server.batches.service import cancel_batch, create_batch

from ..deps import RuntimeDep, TenantDep, batch_store, file_store
from ..errors import ApiError, documented
from ..pagination import page as paginate
from ..schemas import Batch, BatchCreate, BatchError, BatchErrors, BatchList, BatchRequestCounts

router = APIRouter(prefix="/v1/batches", tags=["batches"])

BatchId = Annotated[str, Path(description="a batch id (batch_...)", max_length=64)]
ERRORS = documented(401, 404, 409, 413, 422, 429)


def batch_object(rec: BatchRecord) -> Batch:
    errors = BatchErrors(data=[BatchError(**e) for e in rec.errors]) if rec.errors else None
    return Batch(id=rec.id, endpoint=rec.endpoint, errors=errors, input_file_id=rec.input_file_id,
                 completion_window=rec.completion_window, status=rec.status, output_file_id=rec.output_file_id,
                 error_file_id=rec.error_file_id, created_at=rec.created_at, in_progress_at=rec.in_progress_at,
                 expires_at=rec.expires_at, finalizing_at=rec.finalizing_at, completed_at=rec.completed_at,
                 failed_at=rec.failed_at, expired_at=rec.expired_at, cancelling_at=rec.cancelling_at,
                 cancelled_at=rec.cancelled_at, metadata=rec.metadata,
                 request_counts=BatchRequestCounts(total=rec.total, completed=rec.completed, failed=rec.failed))


@router.post("", response_model=Batch, responses=ERRORS)
async def create(body: BatchCreate, principal: TenantDep, rt: RuntimeDep) -> Batch:
    """Queue a batch of the file's requests (`validating`): a runner checks every line first (a bad file fails the
    batch with line-numbered `errors`), then runs them from idle capacity within `completion_window`."""
    if body.output_expires_after is not None:
        raise ApiError(422, "invalid_request", "body.output_expires_after: not supported (output files are kept "
                                               "until deleted); leave it out")
    s = rt.settings
    rec = await run_in_threadpool(
        create_batch, batch_store(rt), file_store(rt), principal, input_file_id=body.input_file_id,
        endpoint=body.endpoint, completion_window=body.completion_window, metadata=body.metadata,
        max_active=s.max_batches_per_tenant, max_lines=s.max_batch_lines,
        base_model=rt.store.fingerprint.embedding_sha256 if rt.store is not None else None)
    if rt.batch_runner is not None:
        rt.batch_runner.wake()
    return batch_object(rec)


@router.get("", response_model=BatchList, responses=ERRORS)
def list_batches(principal: TenantDep, rt: RuntimeDep, after: Annotated[str | None, Query(max_length=64)] = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> BatchList:
    """Newest first; `after` is the last id of the previous page. An admin sees every tenant's batches."""
    page, more = paginate(batch_store(rt).list(principal.tenant, principal.admin), after, limit)
    data = [batch_object(r) for r in page]
    return BatchList(data=data, has_more=more, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


@router.get("/{batch_id}", response_model=Batch, responses=ERRORS)
def retrieve(batch_id: BatchId, principal: TenantDep, rt: RuntimeDep) -> Batch:
    return batch_object(batch_store(rt).get(batch_id, principal.tenant, principal.admin))


@router.post("/{batch_id}/cancel", response_model=Batch, responses=ERRORS)
def cancel(batch_id: BatchId, principal: TenantDep, rt: RuntimeDep) -> Batch:
    """`cancelling` until the lines in flight are done, then `cancelled` with the output so far; a batch that no
    runner holds yet is cancelled at once. A batch that already ended is a 409."""
    batches = batch_store(rt)
    rec = batches.get(batch_id, principal.tenant, principal.admin)
    if rec.status in TERMINAL:
        raise ApiError(409, "conflict", f"batch {batch_id} already {rec.status}")
    try:
        rec = cancel_batch(batches, batch_id, principal)
    except InvalidPrompt as e:  # it ended between the check and the change
        raise ApiError(409, "conflict", str(e)) from None
    if rt.batch_runner is not None:
        rt.batch_runner.cancel(batch_id)
    return batch_object(rec)
