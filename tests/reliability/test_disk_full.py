"""Disk full on a real filesystem: the store on a 4 MiB tmpfs, filled up by another file.

test_faults.py injects ENOSPC into the writers; this one lets the kernel say it, so every write the store and the
archive extraction really make (staging, fsync, rename, tmp) meets a full disk. Mounting needs root (or
CAP_SYS_ADMIN); where the test cannot mount, it skips and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import (
    ACME,
    DiskWatch,
    assert_error,
    hard_task,
    live_server,
    native_soft_prompt,
    pack,
    private_tempdir,
    upload,
)

SIZE = 4 << 20


@pytest.fixture
def small_fs(tmp_path) -> Path:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a size-limited filesystem")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a {SIZE >> 20} MiB tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{p.stderr.strip() or p.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the filesystem holding `path`."""
    filler = path / "filler.bin"
    free = shutil.disk_usage(path).free
    with open(filler, "wb") as f:
        f.write(bytes(max(0, free - leave)))
    return filler


def test_a_full_disk_refuses_the_upload_loses_nothing_and_keeps_serving(small_fs, tmp_path):
    with private_tempdir(tmp_path / "server-tmp"), live_server(small_fs) as server, server.client(ACME) as c:
        first = pack(native_soft_prompt("prompt_tuning", T=2, seed=1))
        assert upload(c, "soft", first).status_code == 201
        assert hard_task(c, "qa").status_code == 201
        before = c.post("/v1/tasks/soft/generate", json={"input": "hello", "max_new_tokens": 4}).json()["text"]
        tasks = {t["id"]: t["version"] for t in c.get("/v1/tasks").json()["data"]}

        filler = fill(small_fs, leave=16 << 10)
        disk = DiskWatch(server.runtime.settings.store, tmp_path / "server-tmp")
        bigger = pack(native_soft_prompt("prefix_tuning", T=16, seed=2))  # ~0.7 MiB of tensors: cannot fit
        r = upload(c, "soft", bigger)
        err = assert_error(r, 507, "insufficient_storage")
        assert "space" in err["message"].lower()
        disk.assert_unchanged()  # nothing half-written in the store or its tmp

        # nothing lost, and the server keeps serving from what it has
        assert {t["id"]: t["version"] for t in c.get("/v1/tasks").json()["data"]} == tasks
        assert c.post("/v1/tasks/soft/generate", json={"input": "hello", "max_new_tokens": 4}).json()["text"] == before
        assert c.post("/v1/tasks/qa/generate", json={"input": "2+2?", "max_new_tokens": 2}).status_code == 200
        assert c.get("/ready").status_code == 200

        os.remove(filler)  # space again: the same upload goes through as the next version
        r = upload(c, "soft", bigger)
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        assert c.post("/v1/tasks/soft/generate", json={"input": "hello", "max_new_tokens": 4}).status_code == 200
        server.wait_idle()
