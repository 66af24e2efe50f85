"""BatchStore: every batch's record on the shared directory, and claiming a batch under a lease.

The same record store as fine-tuning jobs (training/record_store.py): records are read-modify-write under
ROOT/batches/.lock (fcntl, shared by processes), replaced atomically; a batch is claimed with a lease
(owner host:pid:runner, expiry) that its runner renews, and a batch whose lease expired, or whose owner process on
this host is gone (kill -9, restart), is claimed again and resumes.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from training.files import link_or_copy
from training.record_store import RecordStore, orphaned

from .records import ACTIVE, BATCH_NAME, INPUT_NAME, BatchNotFound, BatchRecord


class BatchStore(RecordStore[BatchRecord]):
    """Records of every batch; several processes (server replicas, batch workers) may share ROOT."""

    folder, record_name, id_prefix, record = "batches", BATCH_NAME, "batch_", BatchRecord
    not_found, what, created_field = BatchNotFound, "batch", "created"

    def batch_dir(self, batch_id: str) -> Path:
        return self.item_dir(batch_id)

    def counts(self) -> dict[str, int]:
        """Batches by status (the metrics collector reads this at scrape time)."""
        out: dict[str, int] = {}
        for rec in self.list():
            out[rec.status] = out.get(rec.status, 0) + 1
        return out

    def active(self, tenant: str) -> int:
        return sum(1 for r in self.list(tenant, admin=False) if r.status in ACTIVE)

    def create(self, rec: BatchRecord, input_path: Path, check: Callable[[], None] = lambda: None) -> BatchRecord:
        """Published by one rename: the record and its own link to the input appear together. `check` runs under
        the lock just before (the tenant's quota of active batches)."""
        stage = self.staging / f"batch-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            link_or_copy(input_path, stage / INPUT_NAME)
            self._stage_record(stage, rec)
            with self.locked():
                check()
                os.rename(stage, self.dir / rec.id)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return rec

    # ---- claiming
    def claim(self, owner: str, lease_s: float, batch_filter: Callable[[BatchRecord], bool] = lambda r: True
              ) -> BatchRecord | None:
        """The oldest active batch that nobody holds, or whose holder's lease expired or process died."""
        with self.locked():
            now = time.time()
            for rec in self.oldest_first():
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
