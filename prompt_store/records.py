"""What the store holds in memory: its settings, one record per live task version, and the index entry of a task."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from prompt_core.spec import PromptSpec

from .archive import ArchiveLimits
from .format import TaskManifest


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
    def ref(self) -> str:
        """`id@version` as its owner knows it (never the storage id)."""
        return f"{self.id}@{self.version}"

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
class IndexedTask:
    """In-memory index entry: live versions of one id and who owns it. Rebuilt, never mutated, on change."""
    id: str
    owner: str
    versions: dict[int, TaskRecord]
    latest: TaskRecord = field(init=False)

    def __post_init__(self) -> None:
        self.latest = self.versions[max(self.versions)]
