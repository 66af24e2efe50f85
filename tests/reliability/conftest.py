"""Shared pieces for the reliability suite: the API tests' live server and builders, a disk-debris check, and a
`python -m server` subprocess for the faults that need a real process (kill -9, SIGTERM).

Every wait here is bounded by a deadline and keyed on something observable.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.api.conftest import (ACME, ADMIN, GLOBEX, METERED, LiveServer, assert_error, hard_task,  # noqa: F401
                                live_server, native_soft_prompt, pack, sse_events, upload, write_auth_file)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


def tree(root: Path) -> set[str]:
    """Every path under root (files and directories), relative; `.lock` is the store's writer lock, always there."""
    root = Path(root)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.name != ".lock"}


@contextmanager
def private_tempdir(path: Path) -> Iterator[Path]:
    """Point tempfile (used by the in-thread server for spooled uploads and exports) at a directory of our own, so
    leftovers can be checked without racing other processes' files in /tmp."""
    path.mkdir(parents=True, exist_ok=True)
    old = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old


class DiskWatch:
    """Snapshot of the store tree and the private temp dir; `assert_unchanged()` after a refused request."""

    def __init__(self, store_root: Path, tmpdir: Path):
        self.store_root, self.tmpdir = Path(store_root), Path(tmpdir)
        self.before = (tree(self.store_root), tree(self.tmpdir))

    def assert_unchanged(self) -> None:
        after = (tree(self.store_root), tree(self.tmpdir))
        added = (after[0] - self.before[0]) | {f"TMPDIR/{p}" for p in after[1] - self.before[1]}
        removed = (self.before[0] - after[0]) | {f"TMPDIR/{p}" for p in self.before[1] - after[1]}
        assert not added and not removed, f"left on disk: {sorted(added)}; removed: {sorted(removed)}"
        assert not any((self.store_root / "tmp").iterdir()), list((self.store_root / "tmp").iterdir())


class ServerProcess:
    """`python -m server --port 0` as operators run it; its log is read on a thread (bounded), the port parsed."""

    def __init__(self, store: Path, *args: str, env: dict | None = None, start_timeout_s: float = 180,
                 python_code: str | None = None):
        full_env = {**os.environ, "PROMPTSERVE_STORE": str(store), "PROMPTSERVE_DEVICE": "cpu",
                    "PROMPTSERVE_DTYPE": "float32", **(env or {})}
        cmd = [sys.executable, "-c", python_code] if python_code else [sys.executable, "-m", "server"]
        self.proc = subprocess.Popen([*cmd, "--port", "0", *args], cwd=REPO, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: deque[str] = deque(maxlen=500)
        threading.Thread(target=self._read, daemon=True).start()
        port = self.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", start_timeout_s).group(1)
        self.url = f"http://127.0.0.1:{port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no log line matching {pattern!r} within {timeout_s} s:\n{''.join(self.log)}")

    def client(self, key: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
