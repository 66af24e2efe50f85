"""JobStore: the records and event logs of every job on the shared directory, and claiming a job under a lease.

Several processes (server replicas, workers) may share ROOT: record updates are read-modify-write under
ROOT/fine_tuning/.lock, events are appended one line per write.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from prompt_store.disk import pid_alive

from ..files import write_json_atomic
from .records import EVENTS_NAME, JOB_NAME, JobNotFound, JobRecord, new_id

log = logging.getLogger("training.jobs")  # one logger for all job code, as the docs and operators know it


class JobStore:
    """Records and events of every job; several processes (server replicas, workers) may share ROOT."""

    def __init__(self, root: Path | str, fsync: bool = True):
        self.root = Path(root)
        self.dir = self.root / "fine_tuning"
        self.staging = self.root / "tmp"
        self.fsync = fsync
        self._tlock = threading.RLock()
        for d in (self.dir, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across threads and processes (record updates are read-modify-write)."""
        with self._tlock:
            with open(self.dir / ".lock", "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def job_dir(self, job_id: str) -> Path:
        return self.dir / job_id

    def _read(self, job_id: str) -> JobRecord | None:
        if not isinstance(job_id, str) or not job_id.startswith("ftjob-") or "/" in job_id or ".." in job_id:
            return None
        try:
            return JobRecord(**json.loads((self.dir / job_id / JOB_NAME).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def get(self, job_id: str, tenant: str | None = None, admin: bool = True) -> JobRecord:
        rec = self._read(job_id)
        if rec is None or (not admin and rec.tenant != tenant):
            raise JobNotFound(f"no fine-tuning job {job_id!r}")
        return rec

    def list(self, tenant: str | None = None, admin: bool = True) -> list[JobRecord]:
        """Newest first."""
        out = []
        for d in self.dir.iterdir():
            rec = self._read(d.name) if d.is_dir() else None
            if rec is not None and (admin or rec.tenant == tenant):
                out.append(rec)
        return sorted(out, key=lambda r: (r.created_at, r.id), reverse=True)

    def _write(self, rec: JobRecord) -> None:
        write_json_atomic(self.dir / rec.id / JOB_NAME, asdict(rec), self.staging, self.fsync)

    def create(self, rec: JobRecord, files: dict[str, Path]) -> JobRecord:
        """Published by one rename: the record and its own copies of the data appear together."""
        stage = self.staging / f"job-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            for name, src in files.items():
                shutil.copyfile(src, stage / name)
            (stage / EVENTS_NAME).touch()
            (stage / JOB_NAME).write_text(json.dumps(asdict(rec), indent=1, sort_keys=True) + "\n")
            os.rename(stage, self.dir / rec.id)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return rec

    def update(self, job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
        with self.locked():
            rec = self.get(job_id)
            change(rec)
            self._write(rec)
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
            for rec in sorted(self.list(), key=lambda r: (r.created_at, r.id)):
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


def orphaned(rec: JobRecord, now: float) -> bool:
    if rec.lease_until < now:
        return True
    host, _, rest = (rec.lease_owner or "").partition(":")
    pid = rest.split(":", 1)[0]
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))
