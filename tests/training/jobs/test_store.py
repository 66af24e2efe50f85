"""The job store (training/jobs/store.py) and cancelling (actions.py) without a model: records are private to their
tenant, jobs are claimed oldest first under a lease that only expiry or a dead owner gives up, a released job goes
back to the queue, a torn last event line is skipped, and cancel stops a queued job at once, a running one at its
next step."""

from __future__ import annotations

import os
import time

import pytest

from prompt_store.errors import InvalidPrompt
from training.jobs import JobNotFound, JobRecord, JobStore, cancel_job
from training.jobs.records import EVENTS_NAME

ME = f"host:{os.getpid()}:runner"


def queued(jobs: JobStore, job_id: str, tenant: str = "acme", created_at: int = 0) -> JobRecord:
    rec = JobRecord(id=job_id, tenant=tenant, open=False, model="default", training_file="file-x",
                    validation_file=None, suffix=None, seed=0, method={"type": "prompt_tuning"}, status="queued",
                    created_at=created_at or int(time.time()))
    return jobs.create(rec, {})


@pytest.fixture
def jobs(tmp_path) -> JobStore:
    return JobStore(tmp_path, fsync=False)


def test_records_are_private_to_their_tenant(jobs):
    queued(jobs, "ftjob-a", tenant="acme")
    assert jobs.get("ftjob-a", "acme", admin=False).tenant == "acme"
    with pytest.raises(JobNotFound):
        jobs.get("ftjob-a", "globex", admin=False)
    assert [r.id for r in jobs.list("globex", admin=False)] == [] and len(jobs.list("globex", admin=True)) == 1


def test_claims_go_oldest_first_and_a_lease_holds_until_it_expires(jobs):
    queued(jobs, "ftjob-new", created_at=200)
    queued(jobs, "ftjob-old", created_at=100)
    first = jobs.claim(ME, lease_s=60)
    assert first.id == "ftjob-old" and first.status == "running" and first.attempts == 1
    assert jobs.claim(ME, lease_s=60).id == "ftjob-new"
    assert jobs.claim(ME, lease_s=60) is None  # both held
    jobs.update("ftjob-old", lambda r: setattr(r, "lease_until", time.time() - 1))  # its runner stopped renewing
    again = jobs.claim("other:1:runner", lease_s=60)
    assert again.id == "ftjob-old" and again.attempts == 2 and again.lease_owner == "other:1:runner"
    assert jobs.events("ftjob-old")[-1]["message"].startswith("resuming (attempt 2)")


def test_a_filter_skips_jobs_a_runner_cannot_train_and_release_requeues(jobs):
    queued(jobs, "ftjob-a")
    assert jobs.claim(ME, 60, job_filter=lambda r: r.base_model == "another model") is None
    jobs.claim(ME, 60)
    jobs.release("ftjob-a", "someone else")  # not the owner: nothing changes
    assert jobs.get("ftjob-a").status == "running"
    jobs.release("ftjob-a", ME)
    rec = jobs.get("ftjob-a")
    assert rec.status == "queued" and rec.lease_owner is None


def test_a_torn_last_event_is_skipped(jobs):
    queued(jobs, "ftjob-a")
    jobs.event("ftjob-a", "step 1")
    with open(jobs.job_dir("ftjob-a") / EVENTS_NAME, "a") as f:
        f.write('{"id": "ftevent-torn", "mess')  # a crash mid-append
    assert [e["message"] for e in jobs.events("ftjob-a")] == ["step 1"]


def test_cancel_stops_a_queued_job_at_once_and_a_running_one_at_its_next_step(jobs):
    queued(jobs, "ftjob-q")
    queued(jobs, "ftjob-r", created_at=1)
    jobs.claim(ME, 60)  # the older one, ftjob-r, is running
    assert cancel_job(jobs, "ftjob-q", "acme", admin=False).status == "cancelled"
    running = cancel_job(jobs, "ftjob-r", "acme", admin=False)
    assert running.status == "running" and running.cancel_requested
    with pytest.raises(InvalidPrompt, match="already cancelled"):
        cancel_job(jobs, "ftjob-q", "acme", admin=False)
    assert [e["message"] for e in jobs.events("ftjob-q")] == ["cancelled"]
