"""BatchStore: every batch's record on the shared directory, and claiming a batch under a lease.

The fine-tuning job store's approach (training/jobs/store.py): records are read-modify-write under
ROOT/batches/.lock (fcntl, shared by processes), replaced atomically; a batch is claimed with a lease
(owner host:pid:runner, expiry) that its runner renews, and a batch whose lease expired, or whose owner process on
this host is gone (kill -9, restart), is claimed again and resumes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from training.files import write_json_atomic
from training.jobs import orphaned

from .records import ACTIVE, BATCH_NAME, INPUT_NAME, BatchNotFound, BatchRecord


class BatchStore:
    """Records of every batch; several processes (server replicas, batch workers) may share ROOT."""

    def __init__(self, root: Path | str, fsync: bool = True):
        self.root = Path(root)
        self.dir = self.root / "batches"
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

    def batch_dir(self, batch_id: str) -> Path:
        return self.dir / batch_id

    def _read(self, batch_id: str) -> BatchRecord | None:
        if not isinstance(batch_id, str) or not batch_id.startswith("batch_") or "/" in batch_id or ".." in batch_id:
            return None
        try:
            return BatchRecord(**json.loads((self.dir / batch_id / BATCH_NAME).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def get(self, batch_id: str, tenant: str | None = None, admin: bool = True) -> BatchRecord:
        rec = self._read(batch_id)
        if rec is None or (not admin and rec.tenant != tenant):
            raise BatchNotFound(f"no batch {batch_id!r}")
        return rec

    def list(self, tenant: str | None = None, admin: bool = True) -> list[BatchRecord]:
        """Newest first."""
        out = []
        for d in self.dir.iterdir():
            rec = self._read(d.name) if d.is_dir() else None
            if rec is not None and (admin or rec.tenant == tenant):
                out.append(rec)
        return sorted(out, key=lambda r: (r.created, r.id), reverse=True)

    def counts(self) -> dict[str, int]:
        """Batches by status (the metrics collector reads this at scrape time)."""
        out: dict[str, int] = {}
        for rec in self.list():
            out[rec.status] = out.get(rec.status, 0) + 1
        return out

    def active(self, tenant: str) -> int:
        return sum(1 for r in self.list(tenant, admin=False) if r.status in ACTIVE)

    def _write(self, rec: BatchRecord) -> None:
        write_json_atomic(self.dir / rec.id / BATCH_NAME, asdict(rec), self.staging, self.fsync)

    def create(self, rec: BatchRecord, input_path: Path, check: Callable[[], None] = lambda: None) -> BatchRecord:
        """Published by one rename: the record and its own link to the input appear together. `check` runs under
        the lock just before (the tenant's quota of active batches)."""
        stage = self.staging / f"batch-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            try:
                os.link(input_path, stage / INPUT_NAME)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(input_path, stage / INPUT_NAME)
            (stage / BATCH_NAME).write_text(json.dumps(asdict(rec), indent=1, sort_keys=True) + "\n")
            with self.locked():
                check()
                os.rename(stage, self.dir / rec.id)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return rec

    def update(self, batch_id: str, change: Callable[[BatchRecord], None]) -> BatchRecord:
        with self.locked():
            rec = self.get(batch_id)
            change(rec)
            self._write(rec)
            return rec

    # ---- claiming
    def claim(self, owner: str, lease_s: float, batch_filter: Callable[[BatchRecord], bool] = lambda r: True
              ) -> BatchRecord | None:
        """The oldest active batch that nobody holds, or whose holder's lease expired or process died."""
        with self.locked():
            now = time.time()
            for rec in sorted(self.list(), key=lambda r: (r.created, r.id)):
                free = rec.lease_owner is None or orphaned(rec, now)
                if rec.status not in ACTIVE or not free or not batch_filter(rec):
                    continue
                rec.lease_owner, rec.lease_until = owner, now + lease_s
                rec.attempts += 1
                self._write(rec)
                return rec
        return None

    def release(self, batch_id: str, owner: str) -> None:
        """Let go of a batch (the runner is stopping); whoever claims it next resumes where it stopped."""
        def change(r: BatchRecord) -> None:
            if r.lease_owner == owner:
                r.lease_owner, r.lease_until = None, 0.0
        self.update(batch_id, change)
