"""RecordStore: durable JSON records of one kind on the shared directory, one folder each, claimed under a lease.

Fine-tuning jobs (training/jobs/store.py) and batches (server/batches/store.py) are the same shape of work: a record
per item in ROOT/<folder>/<id>/, read-modify-write under ROOT/<folder>/.lock (fcntl, shared by processes) and
replaced atomically, published by one rename from ROOT/tmp, and held by a runner under a lease (owner host:pid:runner,
expiry) that it renews. An item whose lease expired, or whose owner process on this host is gone (kill -9, a
restart), is `orphaned` and claimed again. Each store adds what its kind means: which records are claimable, the
events of a job, the input of a batch.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from prompt_store.disk import pid_alive

from .files import write_json_atomic

R = TypeVar("R")


class RecordStore(Generic[R]):
    """Records of one kind; several processes (server replicas, workers) may share ROOT."""

    folder: str                       # ROOT/<folder>/<id>/
    record_name: str                  # the record's file in an item's folder
    id_prefix: str                    # ids outside it are never read (no path out of the folder)
    record: Callable[..., R]          # the record's dataclass
    not_found: type[Exception]
    what: str                         # how a missing item is named: "no <what> 'id'"
    created_field: str                # the record's creation time, for newest-first lists and oldest-first claims

    def __init__(self, root: Path | str, fsync: bool = True):
        self.root = Path(root)
        self.dir = self.root / self.folder
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

    def item_dir(self, item_id: str) -> Path:
        return self.dir / item_id

    def _read(self, item_id: str) -> R | None:
        if not isinstance(item_id, str) or not item_id.startswith(self.id_prefix) or "/" in item_id or \
                ".." in item_id:
            return None
        try:
            return self.record(**json.loads((self.dir / item_id / self.record_name).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def get(self, item_id: str, tenant: str | None = None, admin: bool = True) -> R:
        rec = self._read(item_id)
        if rec is None or (not admin and rec.tenant != tenant):
            raise self.not_found(f"no {self.what} {item_id!r}")
        return rec

    def list(self, tenant: str | None = None, admin: bool = True) -> list[R]:
        """Newest first."""
        out = []
        for d in self.dir.iterdir():
            rec = self._read(d.name) if d.is_dir() else None
            if rec is not None and (admin or rec.tenant == tenant):
                out.append(rec)
        return sorted(out, key=self._age, reverse=True)

    def oldest_first(self) -> list[R]:
        return sorted(self.list(), key=self._age)

    def _age(self, rec: R) -> tuple:
        return getattr(rec, self.created_field), rec.id

    def _write(self, rec: R) -> None:
        write_json_atomic(self.dir / rec.id / self.record_name, asdict(rec), self.staging, self.fsync)

    def _stage_record(self, stage: Path, rec: R) -> None:
        """The record's first version, written into a staging folder that is then renamed into place."""
        (stage / self.record_name).write_text(json.dumps(asdict(rec), indent=1, sort_keys=True) + "\n")

    def update(self, item_id: str, change: Callable[[R], None]) -> R:
        with self.locked():
            rec = self.get(item_id)
            change(rec)
            self._write(rec)
            return rec


def orphaned(rec, now: float) -> bool:
    """A leased record whose lease expired, or whose owner process on this host is gone."""
    if rec.lease_until < now:
        return True
    host, _, rest = (rec.lease_owner or "").partition(":")
    pid = rest.split(":", 1)[0]
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))
