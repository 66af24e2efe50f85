"""Batches inside a server (or a batch worker): the store on the prompt store's directory, the runner over the app
itself, and what the routes do (create with quotas, cancel)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from prompt_store.errors import InvalidPrompt, QuotaExceeded, StoreError
from server.auth import Principal
from training.files import FileStore, new_file_id

from .executor import InProcess
from .gate import IdleCapacity
from .records import ENDPOINTS, TERMINAL, BatchRecord, new_batch_id, parse_window
from .runner import BatchRunner, BatchRunnerConfig
from .store import BatchStore

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from prompt_store.store import PromptStore
    from server.api.limits import TenantLimiter, WorkInFlight
    from server.config import Settings
    from server.engine.async_engine import AsyncEngine
    from server.metrics import Metrics

log = logging.getLogger("server.batches")


def principal_of(rec: BatchRecord) -> Principal:
    """Who a batch's lines run as: its creator, marked as batch work."""
    return Principal(tenant=rec.tenant, admin=rec.admin, open=rec.open, batch=rec.id)


def open_batches(settings: Settings, *, store: PromptStore, files: FileStore, app: ASGIApp, work: WorkInFlight,
                 limiter: TenantLimiter, metrics: Metrics, engine: Callable[[], AsyncEngine | None]
                 ) -> tuple[BatchStore, BatchRunner | None]:
    """Called by Runtime.open once the model, store, engine and file store are up: the batch store, and the batch
    runner thread, started, if this process runs batches (else None). Its lines run through `app` in-process."""
    from server.api.access import find_visible
    from server.api.schemas import BASE_MODEL_ID

    s = settings
    batches = BatchStore(s.store)
    if not s.batch_runner:
        return batches, None

    def visible_for(rec: BatchRecord):
        principal = principal_of(rec)

        def visible(kind: str, ref: str) -> str | None:
            if kind == "model" and ref == BASE_MODEL_ID and s.serve_base_model:
                return None
            try:
                find_visible(store, principal, ref)
            except StoreError as e:
                return str(e)
            return None
        return visible

    def cap_for(rec: BatchRecord) -> int:  # half the tenant's concurrency: its interactive calls keep room
        return min(s.batch_max_in_flight, max(1, limiter.limits(rec.tenant)[0] // 2))

    runner = BatchRunner(
        batches, files, executor_for=lambda rec: InProcess(app, principal_of(rec)), visible_for=visible_for,
        gate=IdleCapacity(work, engine, s.batch_share, s.max_batch_size),
        config=BatchRunnerConfig(max_in_flight=s.batch_max_in_flight), base_model=store.fingerprint.embedding_sha256,
        cap_for=cap_for, on_line=lambda outcome: metrics.batch_requests.labels(outcome).inc())
    runner.start()
    return batches, runner


def create_batch(batches: BatchStore, files: FileStore, principal: Principal, *, input_file_id: str, endpoint: str,
                 completion_window: str, metadata: dict | None, max_active: int, max_lines: int,
                 base_model: str | None) -> BatchRecord:
    """Check the request, the file and the tenant's quotas; then the batch is `validating` until a runner checks
    its lines (a bad file fails the batch with line-numbered errors, as OpenAI does)."""
    if endpoint not in ENDPOINTS:
        raise InvalidPrompt(f"endpoint expected one of {list(ENDPOINTS)}, found {endpoint!r}")
    window = parse_window(completion_window)
    rec_file = files.get(input_file_id, principal.tenant, principal.admin)
    if rec_file.purpose != "batch":
        raise InvalidPrompt(f"input_file_id {input_file_id!r} is a {rec_file.purpose!r} file; upload the requests "
                            "with purpose 'batch'")
    if rec_file.lines > max_lines:
        raise QuotaExceeded(f"the file holds {rec_file.lines} requests; a batch may hold at most {max_lines}: split "
                            "it into several batches")
    used = files.tenant_bytes(principal.tenant)
    if used >= files.limits.max_tenant_bytes:
        raise QuotaExceeded(f"tenant {principal.tenant!r} stores {used} bytes of files (limit "
                            f"{files.limits.max_tenant_bytes}), which leaves no room for the batch's output; delete "
                            "some files")
    now = int(time.time())
    rec = BatchRecord(id=new_batch_id(), tenant=principal.tenant, admin=principal.admin, open=principal.open,
                      endpoint=endpoint, input_file_id=rec_file.id, completion_window=completion_window,
                      expires_at=now + window, output_file=new_file_id(), error_file=new_file_id(),
                      metadata=metadata, created_at=now, base_model=base_model)

    def quota() -> None:  # under the store's lock, so two creates cannot both take the last place
        active = batches.active(principal.tenant)
        if active >= max_active:
            raise QuotaExceeded(f"tenant {principal.tenant!r} has {active} batches queued or running (limit "
                                f"{max_active}); wait for one to finish or cancel one")
    batches.create(rec, files.path(rec_file), check=quota)
    log.info("%s created: %s, %d requests to %s, window %s", rec.id, rec_file.id, rec_file.lines, endpoint,
             completion_window)
    return rec


def cancel_batch(batches: BatchStore, batch_id: str, principal: Principal) -> BatchRecord:
    """A batch nobody runs yet is cancelled at once; a running one is `cancelling` until its lines in flight are
    done (its runner sees the flag within a tick in-process, within a sync from another replica). A batch that
    already ended is InvalidPrompt (the route answers 409)."""
    batches.get(batch_id, principal.tenant, principal.admin)
    was: dict = {}
    now = int(time.time())

    def change(r: BatchRecord) -> None:
        was["status"] = r.status
        if r.status in TERMINAL or r.status in ("cancelling", "finalizing"):  # (finalizing: every line is done)
            return
        r.cancel_requested, r.cancelling_at = True, now
        r.status = "cancelled" if r.status == "validating" and r.lease_owner is None else "cancelling"
        if r.status == "cancelled":
            r.cancelled_at = now
    rec = batches.update(batch_id, change)
    if was["status"] in TERMINAL:
        raise InvalidPrompt(f"batch {batch_id} already {was['status']}")
    if rec.status == "cancelled":
        (batches.batch_dir(batch_id) / "input.jsonl").unlink(missing_ok=True)
    return rec
