"""The store's on-disk protocol: one writer at a time, staging, the publishing rename, tombstones, the generation file.

    ROOT/tasks/<id>/v<N>/{task.json, prompt.safetensors}   one immutable directory per version
    ROOT/tasks/<id>/tombstone.json                          versions <= deleted_through are deleted
    ROOT/generation.json                                    change counter + recent changed ids (for replicas)
    ROOT/tmp/                                               staging; a crash leaves debris only here
    ROOT/quarantine/                                        unreadable entries moved aside at scan time
    ROOT/.lock                                              fcntl lock serializing writers across processes

A version directory is published by one rename, so readers never see half an upload and a kill -9 leaves the
previous version intact. Several processes (replicas) may share ROOT.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .format import utc_now, write_durably

log = logging.getLogger(__name__)

TOMBSTONE_NAME = "tombstone.json"
GENERATION_NAME = "generation.json"
CHANGE_LOG = 1024  # recent changed ids kept in generation.json; a replica further behind rescans everything
STALE_STAGING_S = 3600.0


def fsync_dir(path: Path, fsync: bool = True) -> None:
    if not fsync:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict, staging: Path, fsync: bool = True) -> None:
    tmp = staging / f"{path.name}.{uuid.uuid4().hex}"
    write_durably(tmp, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), fsync)
    os.replace(tmp, path)
    fsync_dir(path.parent, fsync)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreDisk:
    """The directories of one ROOT and every operation that must follow the protocol above."""

    def __init__(self, root: Path, lock: threading.RLock, fsync: bool = True):
        self.root = root
        self.fsync = fsync
        self.tasks_dir = root / "tasks"
        self.staging_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for d in (self.tasks_dir, self.staging_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = lock  # the store's own lock: the writer lock also excludes this process's readers of the index
        self._flock_depth = 0

    @contextmanager
    def exclusive(self) -> Iterator[None]:
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

    # ---------------------------------------------------------------- staging and publishing

    def new_staging(self) -> Path:
        path = self.staging_dir / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def clean_staging(self) -> None:
        """Remove debris of crashed writers: ours (same host, dead pid) at once, anyone's after an hour."""
        host = socket.gethostname()
        now = time.time()
        for p in self.staging_dir.iterdir():
            try:  # names: "<host>-<pid>-<rand>" (staging) or "upload-<host>-<pid>-<rand>" (archive extraction)
                h, pid, _ = p.name.removeprefix("upload-").rsplit("-", 2)
                dead = h == host and not pid_alive(int(pid))
            except ValueError:
                dead = False
            try:
                stale = now - p.stat().st_mtime > STALE_STAGING_S
            except FileNotFoundError:
                continue
            if dead or stale:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def publish(self, staging: Path, task_id: str, version: int) -> Path:
        """Under the exclusive lock: the staged version directory becomes tasks/<id>/v<N> in one rename."""
        fsync_dir(staging, self.fsync)
        task_dir = self.tasks_dir / task_id
        if not task_dir.is_dir():
            task_dir.mkdir()
            fsync_dir(self.tasks_dir, self.fsync)
        final = task_dir / f"v{version}"
        os.rename(staging, final)   # the publish: all or nothing
        fsync_dir(task_dir, self.fsync)
        return final

    def retire_versions(self, task_id: str) -> Path:
        """After a tombstone: move the version directories into a staging directory, which the caller deletes
        once it has let go of the lock."""
        trash = self.new_staging()
        for vdir in (self.tasks_dir / task_id).glob("v*"):
            try:
                os.rename(vdir, trash / vdir.name)
            except OSError as e:
                log.warning("could not remove %s after delete: %s", vdir, e)
        return trash

    def quarantine(self, path: Path, name: str, reason: str) -> None:
        """Move an unreadable entry to ROOT/quarantine with its reason beside it (OSError if the volume refuses)."""
        with self.exclusive():
            if path.exists():
                os.rename(path, self.quarantine_dir / name)
                write_durably(self.quarantine_dir / f"{name}.reason.txt", (reason + "\n").encode())

    # ---------------------------------------------------------------- versions and tombstones

    def next_version(self, task_id: str) -> int:
        """One more than any version ever used by this id (live, deleted or quarantined), so `id@N` never
        comes to mean different bytes."""
        top = 0
        task_dir = self.tasks_dir / task_id
        if task_dir.is_dir():
            for p in task_dir.iterdir():
                if p.name.startswith("v") and p.name[1:].isdigit():
                    top = max(top, int(p.name[1:]))
            top = max(top, self.tombstone(task_id))
        prefix = f"{task_id}@"
        for p in self.quarantine_dir.iterdir():
            if p.name.startswith(prefix):
                num = p.name[len(prefix):].split("-", 1)[0]
                if num.isdigit():
                    top = max(top, int(num))
        return top + 1

    def tombstone(self, task_id: str) -> int:
        """Versions up to this number are deleted (0: none)."""
        path = self.tasks_dir / task_id / TOMBSTONE_NAME
        try:
            return int(json.loads(path.read_text())["deleted_through"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as e:
            log.error("%s is unreadable (%s): treating every version of %s as deleted", path, e, task_id)
            return 1 << 62

    def write_tombstone(self, task_id: str, through: int, by: str) -> None:
        write_json_atomic(self.tasks_dir / task_id / TOMBSTONE_NAME,
                          {"deleted_through": through, "deleted_at": utc_now(), "by": by},
                          self.staging_dir, self.fsync)

    # ---------------------------------------------------------------- the generation file (replicas)

    def read_generation(self) -> tuple[str, int, list[tuple[int, str]]]:
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

    def bump_generation(self, task_id: str) -> tuple[str, int] | None:
        """Under the exclusive lock: generation + 1 and remember which id changed. Returns the (epoch, generation)
        written, or None if the file could not be written (the change itself is already published: replicas see
        it at their next rescan)."""
        epoch, gen, changes = self.read_generation()
        if not epoch:
            epoch, gen, changes = uuid.uuid4().hex, 0, []
        gen += 1
        changes = (changes + [(gen, task_id)])[-CHANGE_LOG:]
        # a hint for replicas, not data: no fsync (after a crash a torn file reads as unreadable -> new epoch)
        try:
            write_json_atomic(self.root / GENERATION_NAME, {"epoch": epoch, "generation": gen, "changes": changes},
                              self.staging_dir, fsync=False)
        except OSError as e:
            log.error("could not bump %s (%s): other replicas see %s at their next rescan", GENERATION_NAME, e,
                      task_id)
            return None
        return epoch, gen
