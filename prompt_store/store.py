"""PromptStore: the durable, versioned, multi-tenant registry of task prompts on one directory.

Layout (docs/prompt-format.md):
    ROOT/tasks/<id>/v<N>/{task.json, prompt.safetensors}   one immutable directory per version
    ROOT/tasks/<id>/tombstone.json                          versions <= deleted_through are deleted
    ROOT/generation.json                                    change counter + recent changed ids (for replicas)
    ROOT/tmp/                                               staging; a crash leaves debris only here
    ROOT/quarantine/                                        unreadable entries moved aside at scan time
    ROOT/.lock                                              fcntl lock serializing writers across processes

Why this shape: a version directory is published by one rename, so readers never see half an upload and a kill -9
leaves the previous version intact. Memory and start-up cost grow with manifests only; tensors go through the tiers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import Label, PromptKind, PromptSpec, PromptTensors, make_labels

from . import peft_io
from .archive import ArchiveLimits, detect_layout, extracted
from .errors import (CorruptArtifact, Forbidden, InvalidPrompt, PayloadTooLarge, QuotaExceeded, StorageFull, StoreError,
                     TaskNotFound, is_disk_full)
from .format import (MANIFEST_NAME, TENSORS_NAME, TaskManifest, decode_tensors, encode_tensors, read_artifact,
                     read_manifest, utc_now, write_durably)
from .tiers import TierCache
from .validate import (NAMESPACE_SEP, check_fingerprint, check_storage_id, check_task_id, check_tenant,
                       check_tensors, expected_shape, own_copy, parse_ref, task_name)

log = logging.getLogger(__name__)

TOMBSTONE_NAME = "tombstone.json"
GENERATION_NAME = "generation.json"
_CHANGE_LOG = 1024  # recent changed ids kept in generation.json; a replica further behind rescans everything
_STALE_STAGING_S = 3600.0


@dataclass
class StoreConfig:
    """Limits and tier budgets; the server fills this from its settings."""
    max_virtual_tokens: int = 512
    max_file_bytes: int = 256 << 20          # any one uploaded file (tensors, config)
    max_tasks_per_tenant: int = 10_000
    max_versions_per_task: int = 1_000      # live versions; delete the task to start over
    host_budget_bytes: int = 1 << 30
    device_budget_bytes: int = 256 << 20
    poll_interval_s: float = 1.0
    preload: list[str] = field(default_factory=list)   # refs loaded into the tiers at start-up
    pin: list[str] = field(default_factory=list)       # refs loaded and never evicted
    base_model: str = ""                               # base_model_name_or_path written into PEFT exports
    fsync: bool = True                                 # False only for benchmarks/tests: no crash safety
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One live task version as the API and engine see it: the manifest fields plus `key` and `spec`."""
    id: str
    version: int
    tenant: str
    visibility: str
    kind: str
    num_virtual_tokens: int
    template: str
    labels: tuple
    task_type: str
    generation: dict
    description: str
    fingerprint: dict | None
    tensors_sha256: str | None
    created_at: str
    spec: PromptSpec
    path: str  # the version directory
    key: str = ""                           # "<storage id>@version": unique in the store, filled by from_manifest
    sid: str = ""                           # the task's directory: its id, or "<id>~<tenant>" for a tenant's copy
    tier_key: tuple[str, str] = ("", "")    # (key, sha256): one shared tuple, so cache lookups hit by identity

    @property
    def is_public(self) -> bool:
        return self.visibility == "public"

    @property
    def ref(self) -> str:
        """`id@version` as its owner knows it (never the storage id)."""
        return f"{self.id}@{self.version}"

    def to_dict(self) -> dict:
        """Public metadata for the API (no filesystem path)."""
        return {"id": self.id, "version": self.version, "key": self.key, "tenant": self.tenant or None,
                "visibility": self.visibility, "kind": self.kind, "num_virtual_tokens": self.num_virtual_tokens,
                "template": self.template, "labels": [dict(x) for x in self.labels], "task_type": self.task_type,
                "generation": dict(self.generation), "description": self.description,
                "fingerprint": self.fingerprint, "tensors_sha256": self.tensors_sha256,
                "created_at": self.created_at}

    @classmethod
    def from_manifest(cls, m: TaskManifest, path: Path, fingerprint: dict | None = None,
                      sid: str | None = None) -> "TaskRecord":
        """Small repeated strings are interned: 10,000 records share them, and hot-path compares hit identity."""
        sid = sid or m.id
        key = f"{sid}@{m.version}"
        return cls(id=m.id, version=m.version, tenant=sys.intern(m.tenant), visibility=sys.intern(m.visibility),
                   kind=sys.intern(m.kind), num_virtual_tokens=m.num_virtual_tokens, template=m.template,
                   labels=tuple(m.labels), task_type=sys.intern(m.task_type), generation=m.generation,
                   description=m.description, key=key, tier_key=(key, m.tensors_sha256 or ""),
                   fingerprint=fingerprint if fingerprint is not None and fingerprint == m.fingerprint
                   else m.fingerprint,  # share one dict across 10,000 records
                   tensors_sha256=m.tensors_sha256, created_at=m.created_at, spec=m.spec(), path=str(path),
                   sid=sid)


@dataclass
class _Task:
    """In-memory index entry: live versions of one id and who owns it. Rebuilt, never mutated, on change."""
    id: str
    owner: str
    versions: dict[int, TaskRecord]
    latest: TaskRecord = field(init=False)

    def __post_init__(self) -> None:
        self.latest = self.versions[max(self.versions)]


def _fsync_dir(path: Path, fsync: bool = True) -> None:
    if not fsync:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict, staging: Path, fsync: bool = True) -> None:
    tmp = staging / f"{path.name}.{uuid.uuid4().hex}"
    write_durably(tmp, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), fsync)
    os.replace(tmp, path)
    _fsync_dir(path.parent, fsync)


def _normalize_labels(labels) -> list[dict]:
    """Accept ["pos", "neg"], {"pos": " positive"} or [{"name": ..., "verbalizer": ...}]."""
    if not labels:
        return []
    if isinstance(labels, list) and all(isinstance(x, dict) for x in labels):
        try:
            labels = {str(x["name"]): str(x["verbalizer"]) for x in labels}
        except KeyError as e:
            raise InvalidPrompt(f"labels expected objects with 'name' and 'verbalizer', found one without {e}") from None
    if not isinstance(labels, (list, dict)):
        raise InvalidPrompt(f"labels expected a list or an object, found {type(labels).__name__}")
    try:
        return [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in make_labels(labels)]
    except ValueError as e:
        raise InvalidPrompt(str(e)) from None


_METADATA_KEYS = {"visibility", "description", "generation", "template", "labels", "task_type"}


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
        self.tasks_dir = self.root / "tasks"
        self.staging_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        for d in (self.tasks_dir, self.staging_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._flock_depth = 0
        self._disk_total = 0  # tensor bytes of live versions, kept incrementally
        self._live: dict[str, TaskRecord] = {}  # "<storage id>@N" -> record of every servable version
        self._owned: dict[str, int] = {}  # live tasks per owner, kept incrementally (quota checks are O(1))
        self._tasks: dict[str, _Task] = {}  # by storage id
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
        self._clean_staging()
        self._epoch, self._generation, _ = self._read_generation()
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
        unknown = sorted(set(meta) - _METADATA_KEYS)
        if unknown:
            raise InvalidPrompt(f"metadata expected only {sorted(_METADATA_KEYS)}, found {unknown}")
        base: dict = {}
        if source_dir is not None:
            spec, tensors, base = self._read_source(Path(source_dir))
        elif spec is None:
            raise InvalidPrompt("create expected a source directory or a spec, found neither")
        base.update({k: v for k, v in meta.items() if v is not None})
        spec = self._final_spec(spec, base)
        check_tensors(spec, tensors, self.fingerprint, self.config.max_virtual_tokens)
        visibility = base.get("visibility")  # None: inherit from the previous version, else private
        labels = [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in spec.labels]
        manifest = TaskManifest(
            id=task_id, version=1, tenant=owner, visibility=visibility or "private", kind=spec.kind.value,
            num_virtual_tokens=spec.num_virtual_tokens, template=spec.template, labels=labels,
            task_type=base.get("task_type") or ("classify" if labels else "generate"),
            generation=base.get("generation") or {}, description=base.get("description") or "",
            fingerprint=self._fp_dict, tensors_sha256=None, created_at=utc_now())
        blob = encode_tensors(spec, tensors)
        if blob is not None:
            manifest.tensors_sha256 = hashlib.sha256(blob).hexdigest()
        manifest.check()
        self._permission_precheck(task_id, tenant, admin)
        staging = self._new_staging()
        try:
            if blob is not None:
                write_durably(staging / TENSORS_NAME, blob, self.config.fsync)
            with self._exclusive():
                self.refresh()
                if tenant is not None:
                    self._rescan_task(own_copy(task_id, tenant))
                self._rescan_task(task_id)
                sid = self._target(task_id, tenant, admin)
                task = self._rescan_task(sid)
                self._check_write(task, task_id, tenant, admin, creating=True)
                if (visibility or (task.latest.visibility if task is not None else "private")) == "public":
                    self._check_public_name(task_id, sid)
                manifest.version = self._next_version(sid)
                if task is not None:
                    manifest.tenant = task.owner  # an admin adding a version does not take the task over
                if visibility is None:
                    manifest.visibility = task.latest.visibility if task is not None else "private"
                write_durably(staging / MANIFEST_NAME,
                              (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode(),
                              self.config.fsync)
                _fsync_dir(staging, self.config.fsync)
                self._before_publish()
                task_dir = self.tasks_dir / sid
                if not task_dir.is_dir():
                    task_dir.mkdir()
                    _fsync_dir(self.tasks_dir, self.config.fsync)
                final = task_dir / f"v{manifest.version}"
                os.rename(staging, final)   # the publish: all or nothing
                _fsync_dir(task_dir, self.config.fsync)
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
        with self._exclusive():
            self.refresh()
            task = self._resolve(task_id, tenant, admin)
            task = self._rescan_task(task.id) if task is not None else None
            if task is None or not self._can_see(task, tenant, admin):
                raise TaskNotFound(f"task {task_id!r} not found")
            name, task_id = task_id, task.id  # the storage id from here on
            if not self._may_change(task, tenant, admin):
                raise Forbidden(f"only the owner of task {name!r} or an admin may delete it")
            through = self._next_version(task_id) - 1
            try:
                _write_json_atomic(self.tasks_dir / task_id / TOMBSTONE_NAME,
                                   {"deleted_through": through, "deleted_at": utc_now(), "by": tenant or ""},
                                   self.staging_dir, self.config.fsync)
            except OSError as e:
                if is_disk_full(e):
                    raise StorageFull(f"no space left on the store's disk ({self.root}); task {name!r} was not "
                                      f"deleted: {e}") from e
                raise
            self._bump_generation(task_id)
            self._rescan_task(task_id)
            trash = self._new_staging()
            for vdir in (self.tasks_dir / task_id).glob("v*"):
                try:
                    os.rename(vdir, trash / vdir.name)
                except OSError as e:
                    log.warning("could not remove %s after delete: %s", vdir, e)
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
        epoch, gen, changes = self._read_generation()
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

    def _resolve(self, name: str, tenant: str | None, admin: bool) -> _Task | None:
        """The task `name` means to this tenant: its own copy of a reused id, else the task of that id if it may
        see it, else a public copy. Admins (and open mode) reach a tenant's copy by its storage id "<id>~<tenant>"."""
        tasks = self._tasks  # atomic reads; _Task objects are replaced, never mutated
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
    def _can_see(task: _Task, tenant: str | None, admin: bool) -> bool:
        return tenant is None or admin or task.owner == tenant or task.latest.visibility == "public"

    @staticmethod
    def _may_change(task: _Task, tenant: str | None, admin: bool) -> bool:
        return tenant is None or admin or task.owner == tenant

    def _check_write(self, task: _Task | None, task_id: str, tenant: str | None, admin: bool,
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

    def _read_source(self, src: Path) -> tuple[PromptSpec, PromptTensors | None, dict]:
        if not src.is_dir():
            raise InvalidPrompt(f"expected an artifact directory, found {src.name!r} is not one")
        for p in src.iterdir():
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise InvalidPrompt(f"expected regular files in the upload, found {p.name!r} is not one")
            if p.is_file() and p.stat().st_size > self.config.max_file_bytes:
                raise PayloadTooLarge(f"{p.name}: expected at most {self.config.max_file_bytes} bytes, "
                                      f"found {p.stat().st_size}")
        pickles = peft_io.find_pickles(src)
        if pickles:
            raise InvalidPrompt(f"refusing {pickles}: {peft_io.PICKLE_REFUSAL}")
        if detect_layout(src) == "peft":
            spec, tensors, _cfg = peft_io.import_peft(src, self.fingerprint)
            return spec, tensors, {}
        try:
            manifest, tensors = read_artifact(src)
        except CorruptArtifact as e:  # in an upload a bad checksum is the uploader's problem, not ours
            raise InvalidPrompt(str(e)) from None
        check_fingerprint(manifest.fingerprint, self.fingerprint)
        base = {"visibility": manifest.visibility, "description": manifest.description,
                "generation": manifest.generation, "task_type": manifest.task_type}
        return manifest.spec(), tensors, base

    @staticmethod
    def _final_spec(spec: PromptSpec, meta: dict) -> PromptSpec:
        template = meta.get("template", spec.template)
        labels = _normalize_labels(meta["labels"]) if "labels" in meta else \
            [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in spec.labels]
        if meta.get("visibility", "private") not in ("private", "public"):
            raise InvalidPrompt(f"visibility expected 'private' or 'public', found {meta['visibility']!r}")
        if "generation" in meta and not isinstance(meta["generation"], dict):
            raise InvalidPrompt(f"generation expected an object, found {type(meta['generation']).__name__}")
        try:
            return PromptSpec(kind=spec.kind, num_virtual_tokens=spec.num_virtual_tokens, template=template,
                              labels=tuple(Label(x["name"], x["verbalizer"]) for x in labels))
        except ValueError as e:
            raise InvalidPrompt(str(e)) from None

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

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Thread lock plus an fcntl lock on ROOT/.lock, so writers in other processes wait too."""
        with self._lock:
            if self._flock_depth:  # already held by this thread (the RLock guarantees it is this one)
                self._flock_depth += 1
                try:
                    yield
                finally:
                    self._flock_depth -= 1
                return
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._flock_depth = 1
                yield
            finally:
                self._flock_depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _before_publish(self) -> None:
        """Hook between writing the staged files and the publishing rename (tests kill a writer here)."""

    def _new_staging(self) -> Path:
        path = self.staging_dir / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def _clean_staging(self) -> None:
        """Remove debris of crashed writers: ours (same host, dead pid) at once, anyone's after an hour."""
        host = socket.gethostname()
        now = time.time()
        for p in self.staging_dir.iterdir():
            try:  # names: "<host>-<pid>-<rand>" (staging) or "upload-<host>-<pid>-<rand>" (archive extraction)
                h, pid, _ = p.name.removeprefix("upload-").rsplit("-", 2)
                dead = h == host and not _pid_alive(int(pid))
            except ValueError:
                dead = False
            try:
                stale = now - p.stat().st_mtime > _STALE_STAGING_S
            except FileNotFoundError:
                continue
            if dead or stale:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def _read_generation(self) -> tuple[str, int, list[tuple[int, str]]]:
        """(epoch, generation, recent changes). A missing or unreadable file is epoch "" and generation 0; a
        writer then starts a new epoch, which makes every replica rescan once instead of trusting old counters."""
        try:
            data = json.loads((self.root / GENERATION_NAME).read_text())
            return (str(data["epoch"]), int(data["generation"]),
                    [(int(g), str(t)) for g, t in data.get("changes", [])])
        except FileNotFoundError:
            return "", 0, []
        except (ValueError, KeyError, TypeError) as e:
            log.error("%s is unreadable (%s); the next write starts a new epoch", GENERATION_NAME, e)
            return "", 0, []

    def _bump_generation(self, task_id: str) -> None:
        """Under the exclusive lock: generation + 1 and remember which id changed."""
        epoch, gen, changes = self._read_generation()
        if not epoch:
            epoch, gen, changes = uuid.uuid4().hex, 0, []
        gen += 1
        changes = (changes + [(gen, task_id)])[-_CHANGE_LOG:]
        # a hint for replicas, not data: no fsync (after a crash a torn file reads as unreadable -> new epoch)
        try:
            _write_json_atomic(self.root / GENERATION_NAME, {"epoch": epoch, "generation": gen, "changes": changes},
                               self.staging_dir, fsync=False)
        except OSError as e:  # the change itself is already published: do not fail it over the hint
            log.error("could not bump %s (%s): other replicas see %s at their next rescan", GENERATION_NAME, e,
                      task_id)
            return
        with self._lock:
            if (self._epoch, self._generation) == (epoch, gen - 1):  # we were up to date: stay so, no rescan
                self._generation = gen

    def _next_version(self, task_id: str) -> int:
        """One more than any version ever used by this id (live, deleted or quarantined), so `id@N` never
        comes to mean different bytes."""
        top = 0
        task_dir = self.tasks_dir / task_id
        if task_dir.is_dir():
            for p in task_dir.iterdir():
                if p.name.startswith("v") and p.name[1:].isdigit():
                    top = max(top, int(p.name[1:]))
            top = max(top, self._tombstone(task_id))
        prefix = f"{task_id}@"
        for p in self.quarantine_dir.iterdir():
            if p.name.startswith(prefix):
                num = p.name[len(prefix):].split("-", 1)[0]
                if num.isdigit():
                    top = max(top, int(num))
        return top + 1

    def _tombstone(self, task_id: str) -> int:
        path = self.tasks_dir / task_id / TOMBSTONE_NAME
        try:
            return int(json.loads(path.read_text())["deleted_through"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as e:
            log.error("%s is unreadable (%s): treating every version of %s as deleted", path, e, task_id)
            return 1 << 62

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

    def _rescan_task(self, task_id: str) -> _Task | None:
        """Re-read one task directory into the index (authoritative: disk wins)."""
        try:
            check_storage_id(task_id)
        except InvalidPrompt:
            self._quarantine(self.tasks_dir / task_id, f"directory name {task_id!r} is not a valid task id")
            return None
        task_dir = self.tasks_dir / task_id
        deleted_through = self._tombstone(task_id)
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
            task = _Task(task_id, owner, versions)
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
            with self._exclusive():
                if path.exists():
                    os.rename(path, self.quarantine_dir / name)
                    write_durably(self.quarantine_dir / f"{name}.reason.txt", (reason + "\n").encode())
        except OSError as e:  # read-only volume: skip it in memory only
            log.error("could not move %s to quarantine (%s); skipping it", path, e)
        self.quarantined.append({"path": str(path), "reason": reason})

    def _count_owner(self, task: _Task | None, delta: int) -> None:
        if task is not None:
            self._owned[task.owner] = self._owned.get(task.owner, 0) + delta

    def _disk_bytes(self) -> None:
        self.tiers.disk.resident_bytes = self._disk_total

    def _task_bytes(self, task: _Task | None) -> int:
        """Tensor bytes of a task's live versions, from shapes (no stat per file)."""
        if task is None or self.fingerprint is None:
            return 0
        total = 0
        for r in task.versions.values():
            want = expected_shape(r.spec, self.fingerprint)
            if want is not None:
                total += 4 * int(torch.Size(want[1]).numel())
        return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["PromptStore", "StoreConfig", "TaskRecord"]
