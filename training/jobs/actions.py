"""What the API does to jobs: create one (checked, then queued durably), cancel one, and publish a finished job's
prompt as a task."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from prompt_store.errors import InvalidPrompt, QuotaExceeded, TaskNotFound

from ..export import ARTIFACT_FILES
from ..files import FileRecord, FileStore
from .method import continued_method, normalize_method, validate_job
from .records import ACTIVE, INIT_NAME, TERMINAL, JobRecord, new_id
from .store import JobStore


def publish_task(store, rec: JobRecord, out: Path):
    """The finished job's artifact becomes task `rec.task_id` of its tenant. Idempotent: a runner that died after
    publishing and before marking the job succeeded finds the task there and does not add a second version."""
    try:
        existing = store.get(rec.task_id, None, admin=True)
        if rec.id in existing.description:
            return existing
    except TaskNotFound:
        pass
    results = json.loads((out / "results.json").read_text())
    metric = "accuracy" if rec.method["task_type"] == "classify" else "exact_match"
    won = (f"auto search winner {results['winner']} of "
           + ", ".join(f"{c['name']} {c['score']:.1f}" for c in results["candidates"] if c["score"] is not None)
           + "; ") if results.get("winner") else ""
    description = (f"{rec.method['type']} ({rec.method['task_type']}) trained by fine-tuning job {rec.id}: {won}"
                   f"held-out {metric} {results['best_score']:.1f} at epoch {results['best_epoch']}, "
                   f"{results['train_examples']} training examples")
    with tempfile.TemporaryDirectory(prefix="publish-", dir=store.staging_dir) as tmp:
        for name in ARTIFACT_FILES:  # only the artifact: logs, checkpoints and the PEFT copy stay with the job
            if (out / name).is_file():
                shutil.copyfile(out / name, Path(tmp) / name)
        return store.create(rec.task_id, None if rec.open else rec.tenant, source_dir=Path(tmp),
                            metadata={"description": description}, admin=False)



def create_job(jobs: JobStore, files: FileStore, *, tenant: str, open_mode: bool, admin: bool, model: str,
               training_file: str, validation_file: str | None, suffix: str | None, seed: int | None,
               method: dict | None, max_active: int, metadata: dict | None = None,
               continue_from: dict | None = None, base_model: str | None = None) -> JobRecord:
    """Check the request, the files and the tenant's quota of active jobs; then queue the job durably.

    `continue_from` ({"key", "kind", "template", "labels", "task_type", "num_virtual_tokens", "tensors"}) is a task
    of the tenant whose prompt the job starts from; its method, template, labels and size are the defaults."""
    train_rec = files.get(training_file, tenant, admin)
    valid_rec: FileRecord | None = files.get(validation_file, tenant, admin) if validation_file else None
    if continue_from is not None:
        method = continued_method(method, continue_from)
    m = normalize_method(method, train_rec.tasks)
    if suffix is not None and (not isinstance(suffix, str) or not suffix or len(suffix) > 40
                               or not all(c.isalnum() or c in "-_." for c in suffix)):
        raise InvalidPrompt(f"suffix expected 1 to 40 letters, digits, '-', '_' or '.', found {suffix!r}")
    seed = int(seed) if seed is not None else 0
    job_id = new_id("ftjob")
    task_id = f"ft-{suffix}-{job_id[6:14]}" if suffix else f"ft-{job_id[6:18]}"
    rec = JobRecord(id=job_id, tenant=tenant, open=open_mode, model=model, training_file=train_rec.id,
                    validation_file=valid_rec.id if valid_rec else None, suffix=suffix, seed=seed, method=m,
                    task_id=task_id, metadata=metadata,
                    init_from=continue_from["key"] if continue_from else None, base_model=base_model)
    validate_job(rec, files.path(train_rec), files.path(valid_rec) if valid_rec else None)
    with jobs.locked():
        active = [j for j in jobs.list(tenant, admin=False) if j.status in ACTIVE]
        if len(active) >= max_active:
            raise QuotaExceeded(f"tenant {tenant!r} has {len(active)} fine-tuning jobs queued or running (limit "
                                f"{max_active}); wait for one to finish or cancel one")
        rec.status = "queued"
        copies = {"train.jsonl": files.path(train_rec)}
        if valid_rec:
            copies["valid.jsonl"] = files.path(valid_rec)
        with tempfile.TemporaryDirectory(dir=jobs.staging) as tmp:
            if continue_from is not None:
                save_file(continue_from["tensors"], str(Path(tmp) / INIT_NAME))
                copies[INIT_NAME] = Path(tmp) / INIT_NAME
            jobs.create(rec, copies)
    jobs.event(rec.id, f"created: {m['type']} {m['task_type']} on {train_rec.filename} ({train_rec.lines} lines)"
                       + (f", validation {valid_rec.filename} ({valid_rec.lines} lines)" if valid_rec else ""))
    return rec


def cancel_job(jobs: JobStore, job_id: str, tenant: str, admin: bool) -> JobRecord:
    """A queued job is cancelled at once; a running one at its next step (its runner sees the flag)."""
    jobs.get(job_id, tenant, admin)
    state: dict = {}

    def change(r: JobRecord) -> None:
        state["was"] = r.status
        if r.status in ("validating_files", "queued"):
            r.status, r.finished_at = "cancelled", int(time.time())
        elif r.status == "running":
            r.cancel_requested = True
    rec = jobs.update(job_id, change)
    if state["was"] in TERMINAL:
        raise InvalidPrompt(f"job {job_id} already {state['was']}")
    if rec.status == "cancelled":
        jobs.event(job_id, "cancelled")
    else:
        jobs.event(job_id, "cancel requested; the job stops at its next step")
    return rec
