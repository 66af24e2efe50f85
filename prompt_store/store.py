"""PromptStore: the durable, versioned, multi-tenant registry of task prompts on one directory.

This file is the store's public API: reading, creating, deleting and exporting tasks, in the order the protocol
needs. The rest is one job per file: the on-disk protocol (layout, writer lock, staging, publishing rename,
tombstones, generation file) in disk.py; the in-memory index of live versions and replica refresh in index.py;
who sees and may change what in access.py; importing an upload in importing.py; the records in records.py. Memory
and start-up cost grow with manifests only; tensors go through the tiers (tiers.py).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors

from . import access, peft_io
from .archive import extracted
from .disk import StoreDisk
from .errors import (
    CorruptArtifact,
    Forbidden,
    InvalidPrompt,
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
    utc_now,
    write_artifact,
)
from .importing import METADATA_KEYS, final_spec, read_source
from .index import TaskIndex
from .records import StoreConfig, TaskRecord
from .tiers import TierCache
from .validate import (
    check_storage_id,
    check_task_id,
    check_tenant,
    check_tensors,
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
                 config: StoreConfig | None = None, poll: bool = False,
                 check_generation: Callable[[dict], None] | None = None) -> None:
        t0 = time.perf_counter()
        self.root = Path(root)
        self.fingerprint = fingerprint
        self._fp_dict = fingerprint.to_dict() if fingerprint is not None else None
        self.config = config or StoreConfig()
        # the server's check of a new version's generation defaults (its response_format compiles), before publish
        self.check_generation = check_generation
        self._lock = threading.RLock()
        self.disk = StoreDisk(self.root, self._lock, self.config.fsync)
        self.tasks_dir, self.staging_dir = self.disk.tasks_dir, self.disk.staging_dir
        self.corrupt: dict[str, str] = {}       # key -> why a tensor load failed
        self.tiers = TierCache(device, dtype, self.config.host_budget_bytes, self.config.device_budget_bytes)
        self.index = TaskIndex(self.disk, self._lock, fingerprint, self._fp_dict, self.tiers)
        self._load_key = self._load_by_key
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.disk.clean_staging()
        self.index.open()
        self.open_seconds = time.perf_counter() - t0
        for ref in self.config.pin:
            rec = self.get(ref, None, admin=True)
            self.tiers.pin(rec.tier_key, self._loader(rec))
        for ref in self.config.preload:
            self.tensors(self.get(ref, None, admin=True))
        if poll:
            self.start_polling()

    @property
    def quarantined(self) -> list[dict]:
        """{"path", "reason"} of entries this process moved aside."""
        return self.index.quarantined

    @property
    def incompatible(self) -> dict[str, str]:
        """key -> why: versions made for another base model, skipped (not moved)."""
        return self.index.incompatible

    # ---------------------------------------------------------------- reading

    def get(self, ref: str, tenant: str | None, admin: bool = False) -> TaskRecord:
        """Resolve `id` (latest) or `id@N` for this tenant; TaskNotFound if it is absent or another tenant's
        private task (the two are indistinguishable)."""
        task_id, version = parse_ref(ref)
        task = access.resolve(self.index, task_id, tenant, admin)
        if task is None:
            self.refresh()  # another replica may have just written it; a cheap generation check when nothing did
            task = access.resolve(self.index, task_id, tenant, admin)
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
            tasks = list(self.index.tasks.values())
        seen = [t for t in tasks if access.can_see(t, tenant, admin)]
        if tenant is not None and not admin:
            seen = [t for t in seen if access.resolve(self.index, task_name(t.id), tenant, admin) is t]
        return sorted((t.latest for t in seen), key=lambda r: (r.id, r.sid))

    def versions(self, task_id: str, tenant: str | None, admin: bool = False) -> list[TaskRecord]:
        task = access.resolve(self.index, check_storage_id(task_id), tenant, admin)
        if task is None:
            raise TaskNotFound(f"task {task_id!r} not found")
        return [task.versions[v] for v in sorted(task.versions)]

    def tensors(self, record: TaskRecord) -> PromptTensors:
        """Device-ready tensors (model dtype, engine layout) through disk -> host -> device.

        Raises TaskNotFound if the version was deleted since `record` was fetched, CorruptArtifact if its file
        fails the checksum (only this task fails)."""
        current = self.index.live.get(record.key)  # a dict read is atomic; writers replace entries whole
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
            tasks = list(self.index.tasks.values())
        return {"tasks": len(tasks), "versions": sum(len(t.versions) for t in tasks),
                "tenants": len({t.owner for t in tasks}), "quarantined": len(self.quarantined),
                "incompatible": len(self.incompatible), "corrupt": len(self.corrupt),
                "generation": self.index.generation, "open_seconds": self.open_seconds, "tiers": self.tiers.stats()}

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
        if self.check_generation is not None and base.get("generation"):
            try:
                self.check_generation(base["generation"])
            except ValueError as e:  # an artifact's own task.json included: nothing is published
                raise InvalidPrompt(f"generation: {e}") from None
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
                    self.index.rescan(own_copy(task_id, tenant))
                self.index.rescan(task_id)
                sid = access.target(self.index, task_id, tenant, admin)
                task = self.index.rescan(sid)
                access.check_write(self.index, self.config, task, task_id, tenant, admin, creating=True)
                if (visibility or (task.latest.visibility if task is not None else "private")) == "public":
                    access.check_public_name(self.index, task_id, sid)
                manifest.version = self.disk.next_version(sid)
                if task is not None:
                    manifest.tenant = task.owner  # an admin adding a version does not take the task over
                if visibility is None:
                    manifest.visibility = task.latest.visibility if task is not None else "private"
                manifest = write_artifact(staging, manifest, tensors, self.config.fsync)
                self._before_publish()
                self.disk.publish(staging, sid, manifest.version)
                self.index.bump_generation(sid)
                self.index.rescan(sid)
                rec = self.index.tasks[sid].versions[manifest.version]
        except OSError as e:
            if is_disk_full(e):
                raise StorageFull(f"no space left on the store's disk ({self.root}); nothing was published: {e}") \
                    from e
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self.index.sync_disk_bytes()
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
            task = access.resolve(self.index, task_id, tenant, admin)
            task = self.index.rescan(task.id) if task is not None else None
            if task is None or not access.can_see(task, tenant, admin):
                raise TaskNotFound(f"task {task_id!r} not found")
            name, task_id = task_id, task.id  # the storage id from here on
            if not access.may_change(task, tenant, admin):
                raise Forbidden(f"only the owner of task {name!r} or an admin may delete it")
            through = self.disk.next_version(task_id) - 1
            try:
                self.disk.write_tombstone(task_id, through, tenant or "")
            except OSError as e:
                if is_disk_full(e):
                    raise StorageFull(f"no space left on the store's disk ({self.root}); task {name!r} was not "
                                      f"deleted: {e}") from e
                raise
            self.index.bump_generation(task_id)
            self.index.rescan(task_id)
            trash = self.disk.retire_versions(task_id)
        shutil.rmtree(trash, ignore_errors=True)
        self.index.sync_disk_bytes()
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
        return self.index.refresh()

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
            tasks = list(self.index.tasks.values())
        for task in tasks:
            for r in task.versions.values():
                try:
                    self.host_tensors(r)
                except StoreError:
                    bad.append(r.key)
        return bad

    # ---------------------------------------------------------------- internals

    def _permission_precheck(self, task_id: str, tenant: str | None, admin: bool) -> None:
        """Fail fast before staging; the authoritative check repeats under the lock."""
        self.refresh()
        with self._lock:
            task = self.index.tasks.get(access.target(self.index, task_id, tenant, admin))
        access.check_write(self.index, self.config, task, task_id, tenant, admin, creating=True)

    def _loader(self, record: TaskRecord):
        return lambda _key: self._load_record(record)

    def _load_by_key(self, key: tuple[str, str]) -> PromptTensors:
        record = self.index.live.get(key[0])
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
            if self.index.live.get(record.key) is None:
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



__all__ = ["PromptStore", "StoreConfig", "TaskRecord"]
