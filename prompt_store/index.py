"""The in-memory index of live task versions, kept in step with the disk (and so with other replicas).

Opening reads every manifest once (never tensors); after that only what changed is read again: this process's own
writes rescan the one task they touched, and `refresh` reads the generation file (one small read) to rescan what
other processes changed, or everything when the change log no longer reaches back far enough. Unreadable entries
are moved to ROOT/quarantine; versions made for another base model are skipped, not moved.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

import torch

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import PromptKind

from .disk import StoreDisk
from .errors import InvalidPrompt, StoreError
from .format import TENSORS_NAME, read_manifest
from .records import IndexedTask, TaskRecord
from .tiers import TierCache
from .validate import NAMESPACE_SEP, check_fingerprint, check_storage_id, expected_shape, task_name

log = logging.getLogger("prompt_store.store")  # the store's one logger, as before the index had its own file


class TaskIndex:
    """Live versions by task, with the counters the store's checks need. Thread-safe under the store's lock;
    readers take the dicts without it (entries are replaced whole, never mutated)."""

    def __init__(self, disk: StoreDisk, lock: threading.RLock, fingerprint: ModelFingerprint | None,
                 fp_dict: dict | None, tiers: TierCache) -> None:
        self.disk, self._lock, self.fingerprint, self._fp_dict, self.tiers = disk, lock, fingerprint, fp_dict, tiers
        self.tasks_dir = disk.tasks_dir
        self.tasks: dict[str, IndexedTask] = {}  # by storage id
        self.live: dict[str, TaskRecord] = {}  # "<storage id>@N" -> record of every servable version
        self.owned: dict[str, int] = {}  # live tasks per owner, kept incrementally (quota checks are O(1))
        self.copies: dict[str, frozenset[str]] = {}  # id -> storage ids "<id>~<tenant>" of tenants' own copies
        self.disk_total = 0  # tensor bytes of live versions, kept incrementally
        self.generation = -1
        self.epoch = ""
        self.quarantined: list[dict] = []    # {"path", "reason"} moved aside by this process
        self.incompatible: dict[str, str] = {}  # key -> why (made for another base model): skipped, not moved

    def open(self) -> None:
        """The generation first, then a full scan: a change published in between is rescanned by the next refresh."""
        self.epoch, self.generation, _ = self.disk.read_generation()
        self.full_scan()

    def owned_by(self, tenant: str | None) -> int:
        with self._lock:
            return self.owned.get(tenant, 0)

    # ---------------------------------------------------------------- replicas

    def refresh(self) -> bool:
        """Pick up other processes' uploads and deletes. Costs one small file read when nothing changed."""
        epoch, gen, changes = self.disk.read_generation()
        with self._lock:
            if (epoch, gen) == (self.epoch, self.generation):
                return False
            seen = self.generation
            oldest = min((g for g, _ in changes), default=gen + 1)
            if epoch and epoch == self.epoch and seen <= gen and oldest <= seen + 1:
                for task_id in {tid for g, tid in changes if g > seen}:  # only what changed since we looked
                    self.rescan(task_id)
            else:  # a new epoch, or we fell behind the change log: rescan everything
                self.full_scan()
            self.epoch, self.generation = epoch, gen
        self.sync_disk_bytes()
        return True

    def bump_generation(self, task_id: str) -> None:
        """Under the exclusive lock: tell replicas `task_id` changed; stay up to date ourselves without a rescan."""
        written = self.disk.bump_generation(task_id)
        if written is None:
            return
        epoch, gen = written
        with self._lock:
            if (self.epoch, self.generation) == (epoch, gen - 1):  # we were up to date: stay so, no rescan
                self.generation = gen

    # ---------------------------------------------------------------- scanning

    def full_scan(self) -> None:
        """Read every manifest (never tensors). Unreadable entries are quarantined; the rest serve."""
        with self._lock:
            found = set()
            for entry in os.scandir(self.tasks_dir):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                found.add(entry.name)
                self.rescan(entry.name)
            for gone in set(self.tasks) - found:
                self.drop(gone)
        self.sync_disk_bytes()

    def rescan(self, task_id: str) -> IndexedTask | None:
        """Re-read one task directory into the index (authoritative: disk wins)."""
        try:
            check_storage_id(task_id)
        except InvalidPrompt:
            self.quarantine(self.tasks_dir / task_id, f"directory name {task_id!r} is not a valid task id")
            return None
        task_dir = self.tasks_dir / task_id
        deleted_through = self.disk.tombstone(task_id)
        versions: dict[int, TaskRecord] = {}
        with self._lock:
            old = self.tasks.get(task_id)
        try:
            names = os.listdir(task_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            if not (name.startswith("v") and name[1:].isdigit()):
                continue
            n = int(name[1:])
            if n <= deleted_through:
                continue
            key = f"{task_id}@{n}"
            if old is not None and n in old.versions:  # version dirs are immutable: keep the parsed record
                versions[n] = old.versions[n]
                continue
            vdir = task_dir / name
            try:
                m = read_manifest(vdir)
                if m.id != task_name(task_id) or m.version != n:
                    raise InvalidPrompt(f"manifest says {m.id}@{m.version}, directory says {key}")
                if m.kind != PromptKind.HARD.value and not (vdir / TENSORS_NAME).is_file():
                    raise InvalidPrompt(f"{TENSORS_NAME} is missing")
            except (StoreError, OSError) as e:
                self.quarantine(vdir, str(e), key)
                continue
            if self.fingerprint is not None and m.fingerprint is not None and m.fingerprint != self._fp_dict:
                try:
                    check_fingerprint(m.fingerprint, self.fingerprint)
                except InvalidPrompt as e:
                    self.incompatible[key] = str(e)
                    log.warning("task %s skipped: %s", key, e)
                    continue
            versions[n] = TaskRecord.from_manifest(m, vdir, self._fp_dict, sid=task_id)
        with self._lock:
            if not versions:
                self.drop(task_id)
                return None
            owner = versions[min(versions)].tenant
            task = IndexedTask(task_id, owner, versions)
            self.tasks[task_id] = task
            if NAMESPACE_SEP in task_id:  # replaced whole, never mutated: readers iterate it without the lock
                name = task_name(task_id)
                self.copies[name] = self.copies.get(name, frozenset()) | {task_id}
            for rec in versions.values():
                self.live[rec.key] = rec
            self.disk_total += self._task_bytes(task) - self._task_bytes(old)
            self._count_owner(old, -1)
            self._count_owner(task, +1)
            if old is not None:
                for n in set(old.versions) - set(versions):
                    self.live.pop(f"{task_id}@{n}", None)
                    self.tiers.discard_task(f"{task_id}@{n}")
            return task

    def drop(self, task_id: str) -> None:
        with self._lock:
            old = self.tasks.pop(task_id, None)
            name = task_name(task_id)
            copies = self.copies.get(name, frozenset()) - {task_id}
            if copies:
                self.copies[name] = copies
            else:
                self.copies.pop(name, None)
            if old is not None:
                for rec in old.versions.values():
                    self.live.pop(rec.key, None)
                self.disk_total -= self._task_bytes(old)
                self._count_owner(old, -1)
                self.tiers.discard_task(f"{task_id}@")

    def quarantine(self, path: Path, reason: str, key: str | None = None) -> None:
        """Move an unreadable entry to ROOT/quarantine (under the writer lock) and log it; others keep serving."""
        name = f"{key or path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        log.error("quarantining %s: %s", path, reason)
        try:
            self.disk.quarantine(path, name, reason)
        except OSError as e:  # read-only volume: skip it in memory only
            log.error("could not move %s to quarantine (%s); skipping it", path, e)
        self.quarantined.append({"path": str(path), "reason": reason})

    # ---------------------------------------------------------------- accounting

    def sync_disk_bytes(self) -> None:
        """The disk tier's gauge follows the live tensor bytes."""
        self.tiers.disk.resident_bytes = self.disk_total

    def _count_owner(self, task: IndexedTask | None, delta: int) -> None:
        if task is not None:
            self.owned[task.owner] = self.owned.get(task.owner, 0) + delta

    def _task_bytes(self, task: IndexedTask | None) -> int:
        """Tensor bytes of a task's live versions, from shapes (no stat per file)."""
        if task is None or self.fingerprint is None:
            return 0
        total = 0
        for r in task.versions.values():
            want = expected_shape(r.spec, self.fingerprint)
            if want is not None:
                total += 4 * int(torch.Size(want[1]).numel())
        return total
