"""Fine-tuning jobs (OpenAI's /v1/fine_tuning/jobs): create, list, retrieve, cancel, events, checkpoints.

A job trains a task prompt on the server's resident frozen model (server/training_service.py, training/jobs/); its
`fine_tuned_model` is a task id of the tenant, usable on every endpoint as soon as the job succeeds. Another
tenant's job is a 404; an admin sees every job.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from prompt_store.errors import InvalidPrompt
from training.config import DEFAULT_LR
from training.jobs import API_METHODS, TERMINAL, JobRecord, cancel_job, create_job

from ..access import find_visible
from ..deps import RuntimeDep, TenantDep, file_store, get_store, job_store
from ..errors import ApiError, documented
from ..pagination import page as paginate
from ..schemas import (
    Checkpoint,
    CheckpointList,
    Job,
    JobCreate,
    JobError,
    JobEvent,
    JobEventList,
    JobList,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

JobId = Annotated[str, Path(description="a job id (ftjob-...)", max_length=64)]
ERRORS = documented(401, 404, 409, 422, 429)
Limit = Annotated[int, Query(ge=1, le=1000)]
After = Annotated[str | None, Query(max_length=64)]


def job_object(rec: JobRecord) -> Job:
    m = rec.method
    return Job(id=rec.id, created_at=rec.created_at, finished_at=rec.finished_at, model=rec.model,
               fine_tuned_model=rec.fine_tuned_model if rec.status == "succeeded" else None,
               organization_id=rec.tenant, status=rec.status, training_file=rec.training_file,
               validation_file=rec.validation_file, hyperparameters=dict(m.get("resolved") or {}),
               method={"type": m["type"], m["type"]: {"hyperparameters": {**(m.get("resolved") or {}),
                                                                          **m["hyperparameters"]},
                                                      "task_type": m["task_type"], "labels": m["labels"],
                                                      "template": m["template"]}},
               seed=rec.seed, trained_tokens=rec.trained_tokens if rec.status in TERMINAL else None,
               estimated_finish=rec.estimated_finish if rec.status == "running" else None,
               error=JobError(**rec.error) if rec.error else None, user_provided_suffix=rec.suffix,
               metadata=rec.metadata, step=rec.step, total_steps=rec.total_steps, result=rec.result)


def _method_from_legacy(body: JobCreate, kind: str = "prompt_tuning") -> dict | None:
    """OpenAI's older top-level `hyperparameters` (n_epochs, batch_size, learning_rate_multiplier) on the default
    method: prompt tuning, or the kind of the task the job continues."""
    if body.hyperparameters is None:
        return body.method
    if body.method is not None:
        raise InvalidPrompt("give hyperparameters inside method, or the top-level hyperparameters, not both")
    hp = {k: v for k, v in body.hyperparameters.items() if v not in (None, "auto")}
    unknown = sorted(set(hp) - {"n_epochs", "batch_size", "learning_rate_multiplier"})
    if unknown:
        raise InvalidPrompt(f"hyperparameters has unknown fields {unknown}")
    if "learning_rate_multiplier" in hp:
        hp["learning_rate"] = DEFAULT_LR.get(API_METHODS.get(kind, ""), DEFAULT_LR["prompt-tuning"]) \
            * float(hp.pop("learning_rate_multiplier"))
    return {"type": kind, kind: {"hyperparameters": hp}}


def _continued_task(rt, principal, ref: str) -> dict:
    """`model` naming a task the caller may use: the job continues its prompt (404 if not visible)."""
    store = get_store(rt)
    record = find_visible(store, principal, ref)
    tensors = store.host_tensors(record) if record.kind != "hard" else None
    t = {} if tensors is None else {k: v.detach().float().cpu().contiguous()
                                    for k, v in (("virtual", tensors.virtual), ("prefix", tensors.prefix))
                                    if v is not None}
    return {"key": record.key, "kind": record.kind, "template": record.template,
            "labels": [dict(x) for x in record.labels], "task_type": record.task_type,
            "num_virtual_tokens": record.num_virtual_tokens, "tensors": t}


@router.post("", response_model=Job, responses=ERRORS)
async def create(body: JobCreate, principal: TenantDep, rt: RuntimeDep) -> Job:
    """Validate the files against the method (line-numbered 422s) and queue the job."""
    files, jobs = file_store(rt), job_store(rt)
    base = None
    if body.model not in ("default", rt.settings.model):
        base = await run_in_threadpool(_continued_task, rt, principal, body.model)
    rec = await run_in_threadpool(
        create_job, jobs, files, tenant=principal.tenant, open_mode=principal.open, admin=principal.admin,
        model=body.model, training_file=body.training_file, validation_file=body.validation_file,
        suffix=body.suffix, seed=body.seed, method=_method_from_legacy(body, base["kind"] if base else "prompt_tuning"),
        max_active=rt.settings.max_jobs_per_tenant, metadata=body.metadata, continue_from=base,
        base_model=rt.store.fingerprint.embedding_sha256 if rt.store is not None else None)
    if rt.job_runner is not None:
        rt.job_runner.wake()
    return job_object(rec)


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(principal: TenantDep, rt: RuntimeDep, after: After = None, limit: Limit = 20) -> JobList:
    """Newest first; an admin sees every tenant's jobs."""
    page, more = paginate(job_store(rt).list(principal.tenant, principal.admin), after, limit)
    return JobList(data=[job_object(r) for r in page], has_more=more)


@router.get("/{job_id}", response_model=Job, responses=ERRORS)
def retrieve(job_id: JobId, principal: TenantDep, rt: RuntimeDep) -> Job:
    return job_object(job_store(rt).get(job_id, principal.tenant, principal.admin))


@router.post("/{job_id}/cancel", response_model=Job, responses=ERRORS)
def cancel(job_id: JobId, principal: TenantDep, rt: RuntimeDep) -> Job:
    """A queued job is cancelled at once; a running one stops at its next step and publishes nothing."""
    jobs = job_store(rt)
    rec = jobs.get(job_id, principal.tenant, principal.admin)
    if rec.status in TERMINAL:
        raise ApiError(409, "conflict", f"job {job_id} already {rec.status}")
    try:
        rec = cancel_job(jobs, job_id, principal.tenant, principal.admin)
    except InvalidPrompt as e:  # it finished between the check and the change
        raise ApiError(409, "conflict", str(e)) from None
    if rt.job_runner is not None:
        rt.job_runner.cancel(job_id)
    return job_object(rec)


@router.get("/{job_id}/events", response_model=JobEventList, responses=ERRORS)
def events(job_id: JobId, principal: TenantDep, rt: RuntimeDep, after: After = None, limit: Limit = 20
           ) -> JobEventList:
    """Newest first: progress (step, training loss, ETA), each epoch's held-out metric, state changes."""
    jobs = job_store(rt)
    jobs.get(job_id, principal.tenant, principal.admin)
    page, more = paginate(list(reversed(jobs.events(job_id))), after, limit)
    return JobEventList(data=[JobEvent(**e) for e in page], has_more=more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=ERRORS)
def checkpoints(job_id: JobId, principal: TenantDep, rt: RuntimeDep, after: After = None, limit: Limit = 10
                ) -> CheckpointList:
    """One per epoch end, newest first, with the training loss and held-out metric at that step."""
    rec = job_store(rt).get(job_id, principal.tenant, principal.admin)
    page, more = paginate(list(reversed(rec.checkpoints)), after, limit)
    data = [Checkpoint(**c) for c in page]
    return CheckpointList(data=data, has_more=more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)
