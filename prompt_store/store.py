"""PromptStore: the durable, versioned, multi-tenant registry of task prompts on one directory.

This file is the store's index and public API: reading, creating and deleting tasks, replica refresh and access
rules. The on-disk protocol (layout, writer lock, staging, publishing rename, tombstones, generation file) is in
disk.py, importing an upload in importing.py, the records in records.py. Memory and start-up cost grow with
manifests only; tensors go through the tiers (tiers.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import torch

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors

from . import peft_io
from .archive import extracted
from .disk import StoreDisk
from .errors import (
    CorruptArtifact,
    Forbidden,
    InvalidPrompt,
    QuotaExceeded,
    StorageFull,
    StoreError,
    TaskNotFound,
    is_disk_full,
)
from .format import (
    MANIFEST_NAME,
    TENSORS_NAME,
    TaskManifest,
    decode_tensors,
    read_manifest,
    utc_now,
    write_artifact,
)
from .importing import METADATA_KEYS, final_spec, read_source
from .records import IndexedTask, StoreConfig, TaskRecord
from .tiers import TierCache
from .validate import (
    NAMESPACE_SEP,
    check_fingerprint,
    check_storage_id,
    check_task_id,
    check_tenant,
    check_tensors,
    expected_shape,
    own_copy,
    parse_ref,
    task_name,
)

log = logging.getLogger(__name__)

class PromptStore:
    """The registry. Thread-safe; several processes may share one ROOT (writers serialize on an fcntl lock).

    tenant=None everywhere means single-tenant open mode (sees and may change everything)."""

    def __init__(self, root: Path | str, fingerprint: ModelFingerprint | None = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 config: StoreConfig | None = None, poll: bool = False) -> None:
        t0 = time.perf_counter()
        self.root = Path(root)
        self.fingerprint = fingerprint
        self._fp_dict = fingerprint.to_dict() if fingerprint is not None else None
        self.config = config or StoreConfig()
        self._lock = threading.RLock()
        self.disk = StoreDisk(self.root, self._lock, self.config.fsync)
        self.tasks_dir, self.staging_dir = self.disk.tasks_dir, self.disk.staging_dir
        self._disk_total = 0  # tensor bytes of live versions, kept incrementally
        self._live: dict[str, TaskRecord] = {}  # "<storage id>@N" -> record of every servable version
        self._owned: dict[str, int] = {}  # live tasks per owner, kept incrementally (quota checks are O(1))
        self._tasks: dict[str, IndexedTask] = {}  # by storage id
        self._copies: dict[str, frozenset[str]] = {}  # id -> storage ids "<id>~<tenant>" of tenants' own copies
        self._generation = -1
        self._epoch = ""
        self.quarantined: list[dict] = []    # {"path", "reason"} moved aside by this process
        self.incompatible: dict[str, str] = {}  # key -> why (made for another base model): skipped, not moved
        self.corrupt: dict[str, str] = {}       # key -> why a tensor load failed
        self.tiers = TierCache(device, dtype, self.config.host_budget_bytes, self.config.device_budget_bytes)
        self._load_key = self._load_by_key
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.disk.clean_staging()
        self._epoch, self._generation, _ = self.disk.read_generation()
        self._full_scan()
        self.open_seconds = time.perf_counter() - t0
        for ref in self.config.pin:
            rec = self.get(ref, None, admin=True)
            self.tiers.pin(rec.tier_key, self._loader(rec))
        for ref in self.config.preload:
            self.tensors(self.get(ref, None, admin=True))
        if poll:
            self.start_polling()

    # ---------------------------------------------------------------- reading

    def get(self, ref: str, tenant: str | None, admin: bool = False) -> TaskRecord:
        """Resolve `id` (latest) or `id@N` for this tenant; TaskNotFound if it is absent or another tenant's
        private task (the two are indistinguishable)."""
        task_id, version = parse_ref(ref)
        task = self._resolve(task_id, tenant, admin)
        if task is None:
            self.refresh()  # another replica may have just written it; a cheap generation check when nothing did
            task = self._resolve(task_id, tenant, admin)
        if task is None:
            raise TaskNotFound(f"task {task_id!r} not found")
        if version is None:
            return task.latest
        rec = task.versions.get(version)
        if rec is None:
            raise TaskNotFound(f"task {task_id!r} has no version {version}; live versions are {sorted(task.versions)}")
        return rec

    def list(self, tenant: str | None, admin: bool = False) -> list[TaskRecord]:
        """Latest version of every task this tenant can see, by id (for an id it reaches twice, the one its requests
        reach: its own copy before another tenant's public task)."""
        with self._lock:
            tasks = list(self._tasks.values())
        seen = [t for t in tasks if self._can_see(t, tenant, admin)]
        if tenant is not None and not admin:
            seen = [t for t in seen if self._resolve(task_name(t.id), tenant, admin) is t]
        return sorted((t.latest for t in seen), key=lambda r: (r.id, r.sid))

    def versions(self, task_id: str, tenant: str | None, admin: bool = False) -> list[TaskRecord]:
        task = self._resolve(check_storage_id(task_id), tenant, admin)
        if task is None:
            raise TaskNotFound(f"task {task_id!r} not found")
        return [task.versions[v] for v in sorted(task.versions)]

    def tensors(self, record: TaskRecord) -> PromptTensors:
        """Device-ready tensors (model dtype, engine layout) through disk -> host -> device.

        Raises TaskNotFound if the version was deleted since `record` was fetched, CorruptArtifact if its file
        fails the checksum (only this task fails)."""
        current = self._live.get(record.key)  # a dict read is atomic; writers replace entries whole
        live = current is not None and (current is record or (current.path == record.path and
                                                               current.tensors_sha256 == record.tensors_sha256))
        if not live:
            raise TaskNotFound(f"task {record.key!r} not found (deleted)")
        if record.kind == "hard":  # interned: an identity compare
            return PromptTensors()
        return self.tiers.get(record.tier_key, self._load_key)  # no per-call closure on the hot path

    def host_tensors(self, record: TaskRecord) -> PromptTensors:
        """The exact fp32 CPU tensors from disk, bypassing the tiers (export, training)."""
        if record.spec.kind is PromptKind.HARD:
            return PromptTensors()
        return self._load_record(record)

    def stats(self) -> dict:
        """Counts and tier counters, for the metrics endpoint."""
        with self._lock:
            tasks = list(self._tasks.values())
        return {"tasks": len(tasks), "versions": sum(len(t.versions) for t in tasks),
                "tenants": len({t.owner for t in tasks}), "quarantined": len(self.quarantined),
                "incompatible": len(self.incompatible), "corrupt": len(self.corrupt),
                "generation": self._generation, "open_seconds": self.open_seconds, "tiers": self.tiers.stats()}

    # ---------------------------------------------------------------- writing

    def create(self, task_id: str, tenant: str | None, *, source_dir: Path | None = None,
               spec: PromptSpec | None = None, tensors: PromptTensors | None = None, metadata: dict | None = None,
               admin: bool = False) -> TaskRecord:
        """Add a task, or a new version of an existing one (owner or admin only).

        Source: a directory holding a native artifact (task.json) or a PEFT adapter (adapter_config.json), or a
        spec with tensors. metadata may set visibility, description, generation, template, labels, task_type."""
        check_task_id(task_id)
        owner = "" if tenant is None else check_tenant(tenant)
        if self.fingerprint is None:
            raise StoreError("this store was opened without a model fingerprint, so it cannot validate uploads")
        meta = dict(metadata or {})
        unknown = sorted(set(meta) - METADATA_KEYS)
        if unknown:
            raise InvalidPrompt(f"metadata expected only {sorted(METADATA_KEYS)}, found {unknown}")
        base: dict = {}
        if source_dir is not None:
            spec, tensors, base = read_source(Path(source_dir), self.fingerprint, self.config.max_file_bytes)
        elif spec is None:
            raise InvalidPrompt("create expected a source directory or a spec, found neither")
        base.update({k: v for k, v in meta.items() if v is not None})
        spec = final_spec(spec, base)
        check_tensors(spec, tensors, self.fingerprint, self.config.max_virtual_tokens)
        visibility = base.get("visibility")  # None: inherit from the previous version, else private
        labels = [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in spec.labels]
        manifest = TaskManifest(
            id=task_id, version=1, tenant=owner, visibility=visibility or "private", kind=spec.kind.value,
            num_virtual_tokens=spec.num_virtual_tokens, template=spec.template, labels=labels,
            task_type=base.get("task_type") or ("classify" if labels else "generate"),
            generation=base.get("generation") or {}, description=base.get("description") or "",
            fingerprint=self._fp_dict, tensors_sha256=None, created_at=utc_now())
        manifest.check()
        self._permission_precheck(task_id, tenant, admin)
        staging = self.disk.new_staging()
        try:
            with self.disk.exclusive():
                self.refresh()
                if tenant is not None:
                    self._rescan_task(own_copy(task_id, tenant))
                self._rescan_task(task_id)
                sid = self._target(task_id, tenant, admin)
                task = self._rescan_task(sid)
                self._check_write(task, task_id, tenant, admin, creating=True)
                if (visibility or (task.latest.visibility if task is not None else "private")) == "public":
                    self._check_public_name(task_id, sid)
                manifest.version = self.disk.next_version(sid)
                if task is not None:
                    manifest.tenant = task.owner  # an admin adding a version does not take the task over
                if visibility is None:
                    manifest.visibility = task.latest.visibility if task is not None else "private"
                manifest = write_artifact(staging, manifest, tensors, self.config.fsync)
                self._before_publish()
                self.disk.publish(staging, sid, manifest.version)
                self._bump_generation(sid)
                self._rescan_task(sid)
                rec = self._tasks[sid].versions[manifest.version]
        except OSError as e:
            if is_disk_full(e):
                raise StorageFull(f"no space left on the store's disk ({self.root}); nothing was published: {e}") \
                    from e
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self._disk_bytes()
        log.info("task %s created by %s", rec.key, tenant or "-")
        return rec

    def create_from_archive(self, task_id: str, tenant: str | None, archive: bytes | Path, *, filename: str = "",
                            metadata: dict | None = None, admin: bool = False) -> TaskRecord:
        """An uploaded .zip/.tar.gz: extracted safely into ROOT/tmp, imported, and always cleaned up."""
        with extracted(archive, self.staging_dir, filename=filename, limits=self.config.archive) as root:
            return self.create(task_id, tenant, source_dir=root, metadata=metadata, admin=admin)

    def delete(self, task_id: str, tenant: str | None, admin: bool = False) -> None:
        """Remove a task (all versions) from service at once: a tombstone first, then the files."""
        if "@" in str(task_id):
            raise InvalidPrompt(f"delete expected a task id without @version, found {task_id!r}")
        check_storage_id(task_id)
        with self.disk.exclusive():
            self.refresh()
            task = self._resolve(task_id, tenant, admin)
            task = self._rescan_task(task.id) if task is not None else None
            if task is None or not self._can_see(task, tenant, admin):
                raise TaskNotFound(f"task {task_id!r} not found")
            name, task_id = task_id, task.id  # the storage id from here on
            if not self._may_change(task, tenant, admin):
                raise Forbidden(f"only the owner of task {name!r} or an admin may delete it")
            through = self.disk.next_version(task_id) - 1
            try:
                self.disk.write_tombstone(task_id, through, tenant or "")
            except OSError as e:
                if is_disk_full(e):
                    raise StorageFull(f"no space left on the store's disk ({self.root}); task {name!r} was not "
                                      f"deleted: {e}") from e
                raise
            self._bump_generation(task_id)
            self._rescan_task(task_id)
            trash = self.disk.retire_versions(task_id)
        shutil.rmtree(trash, ignore_errors=True)
        self._disk_bytes()
        log.info("task %s deleted by %s", task_id, tenant or "-")

    def export_peft(self, ref: str, tenant: str | None, out_dir: Path, admin: bool = False) -> TaskRecord:
        """Write a PEFT adapter directory for a soft prompt (InvalidPrompt for hard prompts or anchored
        P-tuning templates, which PEFT cannot express)."""
        rec = self.get(ref, tenant, admin)
        if self.fingerprint is None:
            raise StoreError("this store was opened without a model fingerprint, so it cannot export PEFT adapters")
        peft_io.export_peft(Path(out_dir), rec.spec, self.host_tensors(rec), self.fingerprint,
                            base_model=self.config.base_model)
        return rec

    def export_artifact(self, ref: str, tenant: str | None, out_dir: Path, admin: bool = False) -> TaskRecord:
        """Copy the native artifact (task.json + prompt.safetensors) out."""
        rec = self.get(ref, tenant, admin)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST_NAME, TENSORS_NAME):
            src = Path(rec.path) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
        return rec

    # ---------------------------------------------------------------- replicas

    def refresh(self) -> bool:
        """Pick up other processes' uploads and deletes. Costs one small file read when nothing changed."""
        epoch, gen, changes = self.disk.read_generation()
        with self._lock:
            if (epoch, gen) == (self._epoch, self._generation):
                return False
            seen = self._generation
            oldest = min((g for g, _ in changes), default=gen + 1)
            if epoch and epoch == self._epoch and seen <= gen and oldest <= seen + 1:
                for task_id in {tid for g, tid in changes if g > seen}:  # only what changed since we looked
                    self._rescan_task(task_id)
            else:  # a new epoch, or we fell behind the change log: rescan everything
                self._full_scan()
            self._epoch, self._generation = epoch, gen
        self._disk_bytes()
        return True

    def start_polling(self, interval_s: float | None = None) -> None:
        """A daemon thread calling refresh() every interval (config.poll_interval_s by default)."""
        if self._poller is not None:
            return
        interval = self.config.poll_interval_s if interval_s is None else interval_s

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception:  # a bad poll must not kill the poller; the next one retries
                    log.exception("prompt store refresh failed")

        self._poller = threading.Thread(target=loop, name="prompt-store-poll", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    def __enter__(self) -> "PromptStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def verify(self) -> list[str]:
        """Check every live tensor file against its sha256 (slow: reads everything); returns failing keys."""
        bad = []
        with self._lock:
            tasks = list(self._tasks.values())
        for task in tasks:
            for r in task.versions.values():
                try:
                    self.host_tensors(r)
                except StoreError:
                    bad.append(r.key)
        return bad

    # ---------------------------------------------------------------- internals

    def _resolve(self, name: str, tenant: str | None, admin: bool) -> IndexedTask | None:
        """The task `name` means to this tenant: its own copy of a reused id, else the task of that id if it may
        see it, else a public copy. Admins (and open mode) reach a tenant's copy by its storage id "<id>~<tenant>"."""
        tasks = self._tasks  # atomic reads; IndexedTask objects are replaced, never mutated
        if NAMESPACE_SEP in name:
            return tasks.get(name) if tenant is None or admin else None
        if tenant is not None:
            own = tasks.get(own_copy(name, tenant))
            if own is not None:
                return own
        task = tasks.get(name)
        if task is not None and self._can_see(task, tenant, admin):
            return task
        for sid in sorted(self._copies.get(name, ())):
            copy = tasks.get(sid)
            if copy is not None and copy.latest.visibility == "public":
                return copy
        return None

    def _target(self, name: str, tenant: str | None, admin: bool) -> str:
        """Where a create of `name` by this tenant goes: the task it reaches by that name, or, when the id is held
        privately by another tenant (invisible to this one), this tenant's own copy, as if the id were free."""
        task = self._resolve(name, tenant, admin)
        if task is not None:
            return task.id
        held = self._tasks.get(name)
        if held is not None and tenant is not None and not self._can_see(held, tenant, admin):
            return own_copy(name, tenant)
        return name

    def _check_public_name(self, name: str, sid: str) -> None:
        """One public task per id: every tenant must reach the same one."""
        for other in [name, *sorted(self._copies.get(name, ()))]:
            task = self._tasks.get(other)
            if other != sid and task is not None and task.latest.visibility == "public":
                raise Forbidden(f"a public task {name!r} already exists; choose another id")

    @staticmethod
    def _can_see(task: IndexedTask, tenant: str | None, admin: bool) -> bool:
        return tenant is None or admin or task.owner == tenant or task.latest.visibility == "public"

    @staticmethod
    def _may_change(task: IndexedTask, tenant: str | None, admin: bool) -> bool:
        return tenant is None or admin or task.owner == tenant

    def _check_write(self, task: IndexedTask | None, task_id: str, tenant: str | None, admin: bool,
                     creating: bool) -> None:
        if task is not None:
            if not self._may_change(task, tenant, admin):
                if self._can_see(task, tenant, admin):
                    raise Forbidden(f"only the owner of task {task_id!r} or an admin may add versions")
                # the id is taken by another tenant's private task: say no without saying whose or what
                raise Forbidden(f"task id {task_id!r} is not available; choose another id")
            if len(task.versions) >= self.config.max_versions_per_task:
                raise QuotaExceeded(f"task {task_id!r} expected at most {self.config.max_versions_per_task} "
                                    f"versions, found {len(task.versions)} already; delete it to start over")
            return
        if creating and tenant is not None and not admin:
            with self._lock:
                owned = self._owned.get(tenant, 0)
            if owned >= self.config.max_tasks_per_tenant:
                raise QuotaExceeded(f"tenant {tenant!r} expected at most {self.config.max_tasks_per_tenant} tasks, "
                                    f"found {owned} already")

    def _permission_precheck(self, task_id: str, tenant: str | None, admin: bool) -> None:
        """Fail fast before staging; the authoritative check repeats under the lock."""
        self.refresh()
        with self._lock:
            task = self._tasks.get(self._target(task_id, tenant, admin))
        self._check_write(task, task_id, tenant, admin, creating=True)

    def _loader(self, record: TaskRecord):
        return lambda _key: self._load_record(record)

    def _load_by_key(self, key: tuple[str, str]) -> PromptTensors:
        record = self._live.get(key[0])
        if record is None or (record.tensors_sha256 or "") != key[1]:
            raise TaskNotFound(f"task {key[0]!r} not found (deleted)")
        return self._load_record(record)

    def _load_record(self, record: TaskRecord) -> PromptTensors:
        """fp32 CPU tensors from disk, checked against the manifest's sha256 and the model's shape."""
        path = Path(record.path) / TENSORS_NAME
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            self.refresh()  # most likely another replica deleted it a moment ago
            if self._live.get(record.key) is None:
                raise TaskNotFound(f"task {record.key!r} not found (deleted)") from None
            self.corrupt[record.key] = "tensor file missing"
            raise CorruptArtifact(f"task {record.key!r}: {TENSORS_NAME} is missing") from None
        try:
            tensors = decode_tensors(blob, record.spec, expected_sha256=record.tensors_sha256,
                                     source=f"task {record.key!r} {TENSORS_NAME}")
            if self.fingerprint is not None:
                check_tensors(record.spec, tensors, self.fingerprint)
        except StoreError as e:
            self.corrupt[record.key] = str(e)
            log.error("task %s cannot be served: %s", record.key, e)
            raise CorruptArtifact(str(e)) from None
        return tensors

    def _before_publish(self) -> None:
        """Hook between writing the staged files and the publishing rename (tests kill a writer here)."""

    def _bump_generation(self, task_id: str) -> None:
        """Under the exclusive lock: tell replicas `task_id` changed; stay up to date ourselves without a rescan."""
        written = self.disk.bump_generation(task_id)
        if written is None:
            return
        epoch, gen = written
        with self._lock:
            if (self._epoch, self._generation) == (epoch, gen - 1):  # we were up to date: stay so, no rescan
                self._generation = gen

    def _full_scan(self) -> None:
        """Read every manifest (never tensors). Unreadable entries are quarantined; the rest serve."""
        with self._lock:
            found = set()
            for entry in os.scandir(self.tasks_dir):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                found.add(entry.name)
                self._rescan_task(entry.name)
            for gone in set(self._tasks) - found:
                self._drop(gone)
        self._disk_bytes()

    def _rescan_task(self, task_id: str) -> IndexedTask | None:
        """Re-read one task directory into the index (authoritative: disk wins)."""
        try:
            check_storage_id(task_id)
        except InvalidPrompt:
            self._quarantine(self.tasks_dir / task_id, f"directory name {task_id!r} is not a valid task id")
            return None
        task_dir = self.tasks_dir / task_id
        deleted_through = self.disk.tombstone(task_id)
        versions: dict[int, TaskRecord] = {}
        with self._lock:
            old = self._tasks.get(task_id)
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
                self._quarantine(vdir, str(e), key)
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
                self._drop(task_id)
                return None
            owner = versions[min(versions)].tenant
            task = IndexedTask(task_id, owner, versions)
            self._tasks[task_id] = task
            if NAMESPACE_SEP in task_id:  # replaced whole, never mutated: readers iterate it without the lock
                name = task_name(task_id)
                self._copies[name] = self._copies.get(name, frozenset()) | {task_id}
            for rec in versions.values():
                self._live[rec.key] = rec
            self._disk_total += self._task_bytes(task) - self._task_bytes(old)
            self._count_owner(old, -1)
            self._count_owner(task, +1)
            if old is not None:
                for n in set(old.versions) - set(versions):
                    self._live.pop(f"{task_id}@{n}", None)
                    self.tiers.discard_task(f"{task_id}@{n}")
            return task

    def _drop(self, task_id: str) -> None:
        with self._lock:
            old = self._tasks.pop(task_id, None)
            name = task_name(task_id)
            copies = self._copies.get(name, frozenset()) - {task_id}
            if copies:
                self._copies[name] = copies
            else:
                self._copies.pop(name, None)
            if old is not None:
                for rec in old.versions.values():
                    self._live.pop(rec.key, None)
                self._disk_total -= self._task_bytes(old)
                self._count_owner(old, -1)
                self.tiers.discard_task(f"{task_id}@")

    def _quarantine(self, path: Path, reason: str, key: str | None = None) -> None:
        """Move an unreadable entry to ROOT/quarantine (under the writer lock) and log it; others keep serving."""
        name = f"{key or path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        log.error("quarantining %s: %s", path, reason)
        try:
            self.disk.quarantine(path, name, reason)
        except OSError as e:  # read-only volume: skip it in memory only
            log.error("could not move %s to quarantine (%s); skipping it", path, e)
        self.quarantined.append({"path": str(path), "reason": reason})

    def _count_owner(self, task: IndexedTask | None, delta: int) -> None:
        if task is not None:
            self._owned[task.owner] = self._owned.get(task.owner, 0) + delta

    def _disk_bytes(self) -> None:
        self.tiers.disk.resident_bytes = self._disk_total

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


__all__ = ["PromptStore", "StoreConfig", "TaskRecord"]
