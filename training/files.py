"""Uploaded training files on the shared store: ROOT/files/<file-id>/{file.json, data.jsonl}.

A file is validated line by line when it is uploaded (any accepted format, see data.FORMATS), so a job never
starts on data it cannot read. Each file directory is written in ROOT/tmp and published by one rename, as the
prompt store publishes versions: a kill -9 leaves either the whole file or nothing. Files are private to the tenant
that uploaded them; another tenant's file reads exactly like a missing one.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from prompt_store.errors import InvalidPrompt, PayloadTooLarge, QuotaExceeded, TaskNotFound
from prompt_store.format import write_durably

from .data import parse_record, read_lines

DATA_NAME = "data.jsonl"
META_NAME = "file.json"
PURPOSES = ("fine-tune",)


class FileNotFound(TaskNotFound):
    """No such file for this tenant (404); never says whether it exists for someone else."""


@dataclass
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    lines: int            # examples (blank lines not counted)
    tasks: list[str]      # tasks the lines allow: "classify", "generate" (both for prompt/completion, messages)


@dataclass
class FileLimits:
    max_file_bytes: int = 32 << 20          # one file (413 above)
    max_tenant_bytes: int = 256 << 20       # all of one tenant's files together (429 above)


def write_json_atomic(path: Path, data: dict, staging: Path, fsync: bool = True) -> None:
    """Write to ROOT/tmp and rename over `path`: readers see the old or the new JSON, never half of one."""
    tmp = staging / f"{path.name}.{uuid.uuid4().hex}"
    write_durably(tmp, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), fsync)
    os.replace(tmp, path)


class FileStore:
    """Thread-safe within a process; several processes may share ROOT (publishing is one rename)."""

    def __init__(self, root: Path | str, limits: FileLimits | None = None, fsync: bool = True):
        self.root = Path(root)
        self.dir = self.root / "files"
        self.staging = self.root / "tmp"
        self.limits = limits or FileLimits()
        self.fsync = fsync
        self._lock = threading.Lock()
        for d in (self.dir, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    # ---- reading
    def _read(self, file_id: str) -> FileRecord | None:
        if not isinstance(file_id, str) or not file_id.startswith("file-") or "/" in file_id or ".." in file_id:
            return None
        path = self.dir / file_id / META_NAME
        try:
            return FileRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def get(self, file_id: str, tenant: str, admin: bool = False) -> FileRecord:
        rec = self._read(file_id)
        if rec is None or (rec.tenant != tenant and not admin):
            raise FileNotFound(f"no file {file_id!r}")
        return rec

    def list(self, tenant: str, admin: bool = False) -> list[FileRecord]:
        """Newest first."""
        out = []
        for d in self.dir.iterdir() if self.dir.is_dir() else ():
            rec = self._read(d.name)
            if rec is not None and (admin or rec.tenant == tenant):
                out.append(rec)
        return sorted(out, key=lambda r: (r.created_at, r.id), reverse=True)

    def path(self, rec: FileRecord) -> Path:
        return self.dir / rec.id / DATA_NAME

    def content(self, rec: FileRecord) -> bytes:
        return self.path(rec).read_bytes()

    def tenant_bytes(self, tenant: str) -> int:
        return sum(r.bytes for r in self.list(tenant))

    # ---- writing
    def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        """Validate every line, check the size limit and the tenant's byte quota, then publish."""
        if purpose not in PURPOSES:
            raise InvalidPrompt(f"purpose expected one of {list(PURPOSES)}, found {purpose!r}")
        if len(data) > self.limits.max_file_bytes:
            raise PayloadTooLarge(f"a file may hold at most {self.limits.max_file_bytes} bytes, found {len(data)}")
        name = Path(filename or "data.jsonl").name[:255] or "data.jsonl"
        examples, tasks = validate_lines(data, name)
        with self._lock:
            used = self.tenant_bytes(tenant)
            if used + len(data) > self.limits.max_tenant_bytes:
                raise QuotaExceeded(f"tenant {tenant!r} stores {used} bytes of files; this one ({len(data)} bytes) "
                                    f"would pass the limit of {self.limits.max_tenant_bytes}; delete some files")
            rec = FileRecord(id=f"file-{uuid.uuid4().hex[:24]}", tenant=tenant, filename=name, purpose=purpose,
                             bytes=len(data), created_at=int(time.time()), lines=len(examples), tasks=tasks)
            stage = self.staging / f"file-{uuid.uuid4().hex}"
            stage.mkdir(parents=True)
            try:
                write_durably(stage / DATA_NAME, data, self.fsync)
                write_durably(stage / META_NAME, (json.dumps(asdict(rec), indent=1) + "\n").encode(), self.fsync)
                os.rename(stage, self.dir / rec.id)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        return rec

    def delete(self, file_id: str, tenant: str, admin: bool = False) -> None:
        rec = self.get(file_id, tenant, admin)
        # renamed away first, so a reader never sees a file directory without its data
        gone = self.staging / f"deleted-{rec.id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.dir / rec.id, gone)
        except FileNotFoundError:
            raise FileNotFound(f"no file {file_id!r}") from None
        shutil.rmtree(gone, ignore_errors=True)


def validate_lines(data: bytes, name: str) -> tuple[list, list[str]]:
    """Every line parsed now (errors name `name:line`); which tasks the file can train: a file of {input, label}
    lines is classify only, {input, output} generate only, prompt/completion and messages either."""
    lines = data.splitlines()
    try:
        examples = read_lines(lines, name, None)
    except ValueError as e:
        raise InvalidPrompt(str(e)) from None
    first: dict[str, int] = {}
    for ex in examples:
        n = int(ex.source.rsplit(":", 1)[1])
        _, _, kind = parse_record(json.loads(lines[n - 1]), None)
        if kind is not None:
            first.setdefault(kind, n)
            if len(first) > 1:
                raise InvalidPrompt(f"{name}:{n}: a {kind} line, but line {first[other(kind)]} is "
                                    f"{other(kind)}; a file trains one kind of task")
    return examples, list(first) or ["classify", "generate"]


def other(kind: str) -> str:
    return "generate" if kind == "classify" else "classify"
