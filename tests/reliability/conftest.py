"""Shared pieces for the reliability suite: the API tests' live server and builders, a disk-debris check, and a
`python -m server` subprocess for the faults that need a real process (kill -9, SIGTERM).

Every wait here is bounded by a deadline and keyed on something observable.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from scripts.common import ServerProcess  # noqa: F401  (re-exported for the tests)
from tests.server.api.conftest import (  # noqa: F401
    ACME,
    ADMIN,
    GLOBEX,
    METERED,
    LiveServer,
    assert_error,
    hard_task,
    live_server,
    native_soft_prompt,
    pack,
    sse_events,
    upload,
    write_auth_file,
)

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


