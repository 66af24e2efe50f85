"""JobStore: the records and event logs of every job on the shared directory, and claiming a job under a lease.

Several processes (server replicas, workers) may share ROOT: record updates are read-modify-write under
ROOT/fine_tuning/.lock (training/record_store.py), events are appended one line per write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from ..record_store import RecordStore, orphaned
from .records import EVENTS_NAME, JOB_NAME, JobNotFound, JobRecord, new_id

log = logging.getLogger("training.jobs")  # one logger for all job code, as the docs and operators know it


class JobStore(RecordStore[JobRecord]):
    """Records and events of every job; several processes (server replicas, workers) may share ROOT."""

    folder, record_name, id_prefix, record = "fine_tuning", JOB_NAME, "ftjob-", JobRecord
    not_found, what, created_field = JobNotFound, "fine-tuning job", "created_at"

    def job_dir(self, job_id: str) -> Path:
        return self.item_dir(job_id)

    def create(self, rec: JobRecord, files: dict[str, Path]) -> JobRecord:
        """Published by one rename: the record and its own copies of the data appear together."""
        stage = self.staging / f"job-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            for name, src in files.items():
                shutil.copyfile(src, stage / name)
            (stage / EVENTS_NAME).touch()
            self._stage_record(stage, rec)
            os.rename(stage, self.dir / rec.id)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return rec

    # ---- events
    def event(self, job_id: str, message: str, level: str = "info", data: dict | None = None,
              type_: str = "message") -> dict:
        ev = {"id": new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": int(time.time()),
              "level": level, "message": message, "data": data or {}, "type": type_}
        line = (json.dumps(ev) + "\n").encode()
        fd = os.open(self.dir / job_id / EVENTS_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one line: appends never interleave within a line
        finally:
            os.close(fd)
        log.info("%s: %s", job_id, message)
        return ev

    def events(self, job_id: str) -> list[dict]:
        """Oldest first; a torn last line (a crash mid-append) is skipped."""
        out = []
        try:
            text = (self.dir / job_id / EVENTS_NAME).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # ---- claiming
    def claim(self, owner: str, lease_s: float, job_filter: Callable[[JobRecord], bool] = lambda r: True
              ) -> JobRecord | None:
        """The oldest job that is queued, or running under an expired lease or a dead process on this host."""
        with self.locked():
            now = time.time()
            for rec in self.oldest_first():
                claimable = rec.status == "queued" or (rec.status == "running" and orphaned(rec, now))
                if not claimable or not job_filter(rec):
                    continue
                resumed = rec.status == "running"
                rec.status, rec.lease_owner, rec.lease_until = "running", owner, now + lease_s
                rec.attempts += 1
                rec.started_at = rec.started_at or int(now)
                self._write(rec)
                if resumed:
                    self.event(rec.id, f"resuming (attempt {rec.attempts}): the previous runner stopped")
                return rec
        return None

    def release(self, job_id: str, owner: str) -> None:
        """Back to the queue (the runner is stopping); it resumes from its checkpoint wherever it is claimed next."""
        def change(r: JobRecord) -> None:
            if r.status == "running" and r.lease_owner == owner:
                r.status, r.lease_owner, r.lease_until = "queued", None, 0.0
        self.update(job_id, change)
