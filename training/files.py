"""Uploaded files on the shared store: ROOT/files/<file-id>/{file.json, data.jsonl}.

Purposes: `fine-tune` (training data), `batch` (a batch's requests: OpenAI's Batch API, server/batches) and
`batch_output` (a batch's output and error files, written by the server, never uploaded). A fine-tuning file is
validated line by line when it is uploaded (any accepted format, see data.FORMATS), so a job never starts on data
it cannot read; a batch file is copied to disk in chunks (never whole in memory) and its lines are checked when a
batch is made of it. Each file directory is written in ROOT/tmp and published by one rename, as the
prompt store publishes versions: a kill -9 leaves either the whole file or nothing. Files are private to the tenant
that uploaded them; another tenant's file reads exactly like a missing one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from prompt_store.errors import InvalidPrompt, PayloadTooLarge, QuotaExceeded, TaskNotFound
from prompt_store.format import write_durably

from .data import parse_record, read_lines

DATA_NAME = "data.jsonl"
META_NAME = "file.json"
PURPOSES = ("fine-tune", "batch")     # what a tenant may upload
OUTPUT_PURPOSE = "batch_output"        # what the server writes: a batch's output and error files
CHUNK = 1 << 20


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
    lines: int            # examples or requests (blank lines not counted)
    tasks: list[str]      # tasks the lines allow: "classify", "generate" (both for prompt/completion, messages);
                          # empty for batch files


@dataclass
class FileLimits:
    max_file_bytes: int = 32 << 20          # one file (413 above)
    max_tenant_bytes: int = 256 << 20       # all of one tenant's files together (429 above)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem has them (no bytes copied), a copy elsewhere."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
        if purpose == "batch":
            return self.create_stream(tenant, filename, purpose, io.BytesIO(data))
        if purpose not in PURPOSES:
            raise InvalidPrompt(f"purpose expected one of {list(PURPOSES)}, found {purpose!r}")
        if len(data) > self.limits.max_file_bytes:
            raise PayloadTooLarge(f"a file may hold at most {self.limits.max_file_bytes} bytes, found {len(data)}")
        name = _name(filename)
        examples, tasks = validate_lines(data, name)
        stage = self.staging / f"file-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            write_durably(stage / DATA_NAME, data, self.fsync)
            return self._publish(stage, tenant, name, purpose, len(data), len(examples), tasks, quota=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def create_stream(self, tenant: str, filename: str, purpose: str, src: BinaryIO) -> FileRecord:
        """A batch file, copied from `src` to ROOT/tmp a chunk at a time (a 100,000-line file is never whole in
        memory) and counted as it goes; its lines are checked when a batch is made of it."""
        if purpose != "batch":
            raise InvalidPrompt(f"purpose expected 'batch' for a streamed file, found {purpose!r}")
        name = _name(filename)
        stage = self.staging / f"file-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            size, lines, pending = 0, 0, b""
            with open(stage / DATA_NAME, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if size > self.limits.max_file_bytes:
                        raise PayloadTooLarge(f"a file may hold at most {self.limits.max_file_bytes} bytes, found "
                                              "more")
                    out.write(chunk)
                    parts = (pending + chunk).split(b"\n")
                    pending = parts.pop()
                    lines += sum(1 for p in parts if p.strip())
                lines += 1 if pending.strip() else 0
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            if not lines:
                raise InvalidPrompt(f"{name}: no requests (every line is blank)")
            return self._publish(stage, tenant, name, purpose, size, lines, [], quota=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def publish_output(self, file_id: str, tenant: str, filename: str, src: Path, lines: int) -> FileRecord:
        """A batch's output or error file under the id its batch fixed in advance: `src` is hard-linked in (no copy),
        and publishing twice (a runner that died after the first) returns the first. Outside the byte quota: the
        server writes it, and the quota was checked when the batch was made."""
        existing = self._read(file_id)
        if existing is not None:
            return existing
        stage = self.staging / f"file-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            link_or_copy(src, stage / DATA_NAME)
            return self._publish(stage, tenant, filename, OUTPUT_PURPOSE, (stage / DATA_NAME).stat().st_size,
                                 lines, [], quota=False, file_id=file_id)
        except OSError:  # another runner published it between the check and the rename
            existing = self._read(file_id)
            if existing is None:
                raise
            return existing
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _publish(self, stage: Path, tenant: str, name: str, purpose: str, size: int, lines: int, tasks: list[str],
                 quota: bool, file_id: str | None = None) -> FileRecord:
        """stage/data.jsonl is written: check the tenant's byte quota, add file.json, publish by one rename."""
        with self._lock:
            used = self.tenant_bytes(tenant)
            if quota and used + size > self.limits.max_tenant_bytes:
                raise QuotaExceeded(f"tenant {tenant!r} stores {used} bytes of files; this one ({size} bytes) "
                                    f"would pass the limit of {self.limits.max_tenant_bytes}; delete some files")
            rec = FileRecord(id=file_id or new_file_id(), tenant=tenant, filename=name, purpose=purpose,
                             bytes=size, created_at=int(time.time()), lines=lines, tasks=tasks)
            write_durably(stage / META_NAME, (json.dumps(asdict(rec), indent=1) + "\n").encode(), self.fsync)
            os.rename(stage, self.dir / rec.id)
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


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def _name(filename: str) -> str:
    return Path(filename or "data.jsonl").name[:255] or "data.jsonl"


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
