"""PromptStore behaviour: versions, tenants, deletes, durability, quarantine, replicas and concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from prompt_core.spec import PromptSpec, PromptTensors
from prompt_store.errors import CorruptArtifact, Forbidden, InvalidPrompt, QuotaExceeded, TaskNotFound
from prompt_store.store import PromptStore

REPO = Path(__file__).resolve().parents[2]
PT = PromptSpec("prompt_tuning", 4)


def vt(seed: float) -> PromptTensors:
    return PromptTensors(virtual=torch.full((4, 64), float(seed)))


def test_versions_and_pins(make_store):
    s = make_store()
    r1 = s.create("sent", "alice", spec=PT, tensors=vt(1), metadata={"description": "first"})
    r2 = s.create("sent", "alice", spec=PT, tensors=vt(2), metadata={"labels": ["pos", "neg"]})
    assert (r1.key, r2.key) == ("sent@1", "sent@2")
    assert s.get("sent", "alice").key == "sent@2"
    assert s.get("sent@1", "alice").description == "first"
    assert float(s.tensors(s.get("sent@1", "alice")).virtual[0, 0]) == 1.0
    assert float(s.tensors(s.get("sent", "alice")).virtual[0, 0]) == 2.0
    assert r2.task_type == "classify" and [x["verbalizer"] for x in r2.labels] == [" pos", " neg"]
    assert [r.key for r in s.versions("sent", "alice")] == ["sent@1", "sent@2"]
    with pytest.raises(TaskNotFound, match="no version 3"):
        s.get("sent@3", "alice")
    # a fresh process sees the same thing from disk
    s2 = PromptStore(s.root, s.fingerprint)
    assert s2.get("sent", "alice").key == "sent@2"
    assert torch.equal(s2.tensors(s2.get("sent@1", "alice")).virtual, vt(1).virtual)
    assert (s.root / "tasks" / "sent" / "v2" / "task.json").is_file()


def test_tenants_and_visibility(make_store):
    s = make_store()
    s.create("secret", "alice", spec=PT, tensors=vt(1))
    s.create("shared", "alice", spec=PT, tensors=vt(2), metadata={"visibility": "public"})
    assert [r.id for r in s.list("alice")] == ["secret", "shared"]
    assert [r.id for r in s.list("bob")] == ["shared"]
    assert [r.id for r in s.list(None)] == ["secret", "shared"]  # open mode
    assert [r.id for r in s.list("bob", admin=True)] == ["secret", "shared"]
    # another tenant's private task is indistinguishable from a missing one
    with pytest.raises(TaskNotFound) as hidden:
        s.get("secret", "bob")
    with pytest.raises(TaskNotFound) as missing:
        s.get("nothing", "bob")
    assert str(hidden.value).replace("secret", "X") == str(missing.value).replace("nothing", "X")
    with pytest.raises(TaskNotFound):
        s.delete("secret", "bob")
    with pytest.raises(TaskNotFound):
        s.export_peft("secret", "bob", s.root / "out")
    # public: bob may read and serve but not change it
    assert s.tensors(s.get("shared", "bob")).virtual.shape == (4, 64)
    with pytest.raises(Forbidden, match="only the owner"):
        s.delete("shared", "bob")
    with pytest.raises(Forbidden, match="only the owner"):
        s.create("shared", "bob", spec=PT, tensors=vt(3))
    # an admin may add a version; the task stays alice's and keeps its visibility
    r = s.create("shared", "root", spec=PT, tensors=vt(4), admin=True)
    assert (r.version, r.tenant, r.visibility) == (2, "alice", "public")
    s.delete("shared", "bob", admin=True)
    assert [r.id for r in s.list("alice")] == ["secret"]


def test_an_id_held_privately_by_another_tenant_is_free_in_each_namespace(make_store):
    """bob creating alice's private id gets his own task of that name, as if the id were free; nothing of alice's
    is reachable, changed or revealed, and each reaches its own under the same name."""
    s = make_store()
    alice = s.create("secret", "alice", spec=PT, tensors=vt(1))
    bob = s.create("secret", "bob", spec=PT, tensors=vt(2))
    assert (bob.id, bob.version, bob.tenant, bob.ref) == ("secret", 1, "bob", "secret@1")
    assert bob.key != alice.key  # the engine and caches tell them apart
    assert s.create("secret", "bob", spec=PT, tensors=vt(3)).version == 2  # bob adds versions to his own
    assert float(s.tensors(s.get("secret", "bob")).virtual[0, 0]) == 3.0
    assert float(s.tensors(s.get("secret", "alice")).virtual[0, 0]) == 1.0
    assert [r.version for r in s.versions("secret", "alice")] == [1]
    assert [(r.id, r.tenant) for r in s.list("bob")] == [("secret", "bob")]
    with pytest.raises(TaskNotFound):
        s.get("secret", "carol")
    with pytest.raises(TaskNotFound):  # a tenant cannot address the storage name of another's copy
        s.get(bob.sid, "alice")
    assert s.get(bob.sid, "root", admin=True).tenant == "bob"  # admins can
    # a fresh process (another replica) resolves the same way
    s2 = PromptStore(s.root, s.fingerprint)
    assert s2.get("secret", "bob").version == 2 and s2.get("secret", "alice").version == 1
    # one public task per id: bob's copy goes public, so alice may not publish hers (public ids are no secret)
    s.create("secret", "bob", spec=PT, tensors=vt(4), metadata={"visibility": "public"})
    assert s.get("secret", "carol").tenant == "bob"
    with pytest.raises(Forbidden, match="public task 'secret' already exists"):
        s.create("secret", "alice", spec=PT, tensors=vt(5), metadata={"visibility": "public"})
    assert s.get("secret", "alice").tenant == "alice"  # her own wins for her
    # deleting bob's copy leaves alice's task as it was
    s.delete("secret", "bob")
    with pytest.raises(TaskNotFound):
        s.get("secret", "bob")
    assert s.get("secret", "alice").version == 1


def test_quota(make_store):
    s = make_store(max_tasks_per_tenant=2)
    s.create("a", "alice", spec=PT, tensors=vt(1))
    s.create("b", "alice", spec=PT, tensors=vt(1))
    s.create("b", "alice", spec=PT, tensors=vt(2))  # a new version is not a new task
    with pytest.raises(QuotaExceeded, match="at most 2 tasks, found 2"):
        s.create("c", "alice", spec=PT, tensors=vt(1))
    s.create("c", "bob", spec=PT, tensors=vt(1))
    s.delete("a", "alice")
    s.create("c2", "alice", spec=PT, tensors=vt(1))
    v = make_store(root=s.root / "v", max_versions_per_task=2)
    v.create("x", "alice", spec=PT, tensors=vt(1))
    v.create("x", "alice", spec=PT, tensors=vt(2))
    with pytest.raises(QuotaExceeded, match="at most 2 versions, found 2"):
        v.create("x", "alice", spec=PT, tensors=vt(3))


def test_delete_is_immediate_and_versions_never_reused(make_store):
    s = make_store()
    r1 = s.create("t", "alice", spec=PT, tensors=vt(1))
    s.create("t", "alice", spec=PT, tensors=vt(2))
    s.tensors(r1)  # cached in the tiers
    s.delete("t", "alice")
    with pytest.raises(TaskNotFound):
        s.get("t", "alice")
    with pytest.raises(TaskNotFound):
        s.tensors(r1)  # a record fetched before the delete no longer serves
    assert s.stats()["tiers"]["host"]["entries"] == 0
    assert not list((s.root / "tasks" / "t").glob("v*"))
    reopened = PromptStore(s.root, s.fingerprint)  # the tombstone survives a restart
    with pytest.raises(TaskNotFound):
        reopened.get("t", None)
    r3 = s.create("t", "bob", spec=PT, tensors=vt(3))
    assert r3.key == "t@3" and r3.tenant == "bob"  # the id is free again but t@1 never means other bytes
    with pytest.raises(TaskNotFound):
        s.get("t@1", "bob")
    assert not list((s.root / "tmp").iterdir())
    assert reopened.get("t", "bob").key == "t@3"  # a miss refreshes from disk: no poller needed


def test_store_exports(make_store, tmp_path):
    s = make_store()
    s.create("p", "alice", spec=PromptSpec("prefix_tuning", 3),
             tensors=PromptTensors(prefix=torch.randn(2, 2, 2, 3, 16)))
    s.export_peft("p", "alice", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_attention_heads"] == 2 and cfg["token_dim"] == 32
    s.create("h", "alice", spec=PromptSpec("hard", 0, "Q: {input}"))
    with pytest.raises(InvalidPrompt, match="hard prompt"):
        s.export_peft("h", "alice", tmp_path / "peft2")
    s.export_artifact("p", "alice", tmp_path / "native")
    r = s.create("p-copy", "bob", source_dir=tmp_path / "native")
    assert torch.equal(s.host_tensors(r).prefix, s.host_tensors(s.get("p", "alice")).prefix)
    r = s.create("p-peft", "bob", source_dir=tmp_path / "peft")
    assert torch.equal(s.host_tensors(r).prefix, s.host_tensors(s.get("p", "alice")).prefix)


def test_quarantine_corrupt_manifest(make_store, caplog):
    s = make_store()
    for i, tid in enumerate(["a", "b", "c"]):
        s.create(tid, "alice", spec=PT, tensors=vt(i))
    (s.root / "tasks" / "b" / "v1" / "task.json").write_text("{not json")
    (s.root / "tasks" / "c" / "v1" / "task.json").write_bytes(b"\xff\xfe\x00garbage")
    s2 = PromptStore(s.root, s.fingerprint)
    assert [r.id for r in s2.list(None)] == ["a"]
    assert s2.stats()["quarantined"] == 2
    moved = sorted(p.name for p in (s.root / "quarantine").iterdir() if p.is_dir())
    assert [m.split("-")[0] for m in moved] == ["b@1", "c@1"]
    assert "quarantining" in caplog.text
    assert float(s2.tensors(s2.get("a", None)).virtual[0, 0]) == 0.0
    # the quarantined version number is not reused
    assert s2.create("b", "alice", spec=PT, tensors=vt(5)).version == 2


def test_corrupt_tensor_file_fails_only_that_task(make_store):
    s = make_store()
    ra = s.create("a", "alice", spec=PT, tensors=vt(1))
    rb = s.create("b", "alice", spec=PT, tensors=vt(2))
    p = Path(rb.path) / "prompt.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x01
    p.write_bytes(bytes(raw))
    s2 = PromptStore(s.root, s.fingerprint)
    with pytest.raises(CorruptArtifact, match=r"sha256 mismatch, expected [0-9a-f]{64}, found [0-9a-f]{64}"):
        s2.tensors(s2.get("b", None))
    assert torch.equal(s2.tensors(s2.get("a", None)).virtual, vt(1).virtual)
    assert s2.stats()["corrupt"] == 1 and s2.stats()["tiers"]["disk"]["errors"] == 1
    assert s2.verify() == ["b@1"]
    assert ra.key == "a@1"


def _fp_json(store) -> str:
    return json.dumps(store.fingerprint.to_dict())


def _worker(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.prompt_store.store_worker", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_mid_write_leaves_nothing_visible(make_store):
    s = make_store()
    s.create("t", "alice", spec=PT, tensors=vt(1))
    proc = _worker("hang-before-publish", s.root, _fp_json(s), "t")
    deadline = time.time() + 60
    while not (s.root / "READY_TO_PUBLISH").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    staged = [p for p in (s.root / "tmp").iterdir()]
    assert staged and any((p / "task.json").exists() for p in staged)  # it really was mid-write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    s.refresh()
    assert [r.key for r in s.versions("t", None)] == ["t@1"]
    s2 = PromptStore(s.root, s.fingerprint)  # a restart sees the same and cleans the dead writer's debris
    assert [r.key for r in s2.versions("t", None)] == ["t@1"]
    assert torch.equal(s2.tensors(s2.get("t", None)).virtual, vt(1).virtual)
    assert not list((s.root / "tmp").iterdir())
    assert s2.create("t", "alice", spec=PT, tensors=vt(2)).key == "t@2"  # the lock was released by the kill


def test_random_kills_never_leave_a_broken_version(make_store):
    s = make_store()
    for delay in (0.4, 0.9, 1.5):
        proc = _worker("create-loop", s.root, _fp_json(s), "t", 1000)
        while proc.stdout.readline().strip() != "created":  # let it get going, then kill it mid-stream
            assert proc.poll() is None, proc.stderr.read()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    s2 = PromptStore(s.root, s.fingerprint)
    versions = s2.versions("t", None)
    assert [r.version for r in versions] == list(range(1, len(versions) + 1))
    for r in versions:  # every visible version is complete and checks out
        t = s2.host_tensors(r).virtual
        assert t.shape == (4, 64) and bool((t == t[0, 0]).all())
    assert s2.stats()["quarantined"] == 0


def test_concurrent_writers_processes_and_threads(make_store):
    s = make_store()
    procs = [_worker("create-loop", s.root, _fp_json(s), "t", 4, base) for base in (1000, 2000)]
    errors = []

    def thread_writer(i: int) -> None:
        try:
            for k in range(3):
                s.create("t", "alice", spec=PT, tensors=vt(100 * i + k))
        except Exception as e:  # noqa: BLE001 - any failure in a writer thread is reported below
            errors.append(e)

    threads = [threading.Thread(target=thread_writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert not errors
    s.refresh()
    versions = s.versions("t", None)
    assert [r.version for r in versions] == list(range(1, 15))
    values = sorted(float(s.host_tensors(r).virtual[0, 0]) for r in versions)
    assert values == sorted([0, 1, 2, 100, 101, 102, 1000, 1001, 1002, 1003, 2000, 2001, 2002, 2003])


def test_two_processes_share_one_store(make_store):
    s = make_store(poll_interval_s=0.2)
    s.start_polling()
    proc = _worker("replica", s.root, _fp_json(s))
    assert proc.stdout.readline().strip() == "created from-b", proc.stderr.read()
    deadline = time.time() + 5
    while "from-b" not in {r.id for r in s.list(None)}:  # list() never refreshes itself: the poller must
        assert time.time() < deadline, "the other process's upload never became visible"
        time.sleep(0.05)
    assert s.get("from-b", "alice").tenant == "bob"
    assert float(s.tensors(s.get("from-b", "alice")).virtual[0, 0]) == 2.0
    s.create("from-a", "alice", spec=PT, tensors=vt(7))
    assert proc.stdout.readline().split() == ["saw", "from-a", "7.0"]
    s.delete("from-a", "alice")
    assert proc.stdout.readline().strip() == "from-a gone"
    assert proc.wait(timeout=30) == 0


def test_refresh_is_cheap_when_nothing_changed(make_store):
    s = make_store()
    for i in range(50):
        s.create(f"t{i}", "alice", spec=PT, tensors=vt(i))
    assert s.refresh() is False
    t0 = time.perf_counter()
    for _ in range(100):
        s.refresh()
    assert (time.perf_counter() - t0) / 100 < 0.005
    other = PromptStore(s.root, s.fingerprint)
    other.create("t0", "alice", spec=PT, tensors=vt(9))
    assert s.refresh() is True and s.get("t0", None).version == 2


def test_lost_generation_file_starts_a_new_epoch(make_store):
    """If generation.json is lost or torn (it is not fsynced), counters restart; replicas must not ignore the
    restarted counter just because it is lower than what they had seen."""
    a = make_store()
    for i in range(5):
        a.create(f"t{i}", "alice", spec=PT, tensors=vt(i))
    b = PromptStore(a.root, a.fingerprint)
    (a.root / "generation.json").write_text("{torn")
    assert b.refresh() is True and len(b.list(None)) == 5  # unreadable: one full rescan, nothing lost
    assert b.refresh() is False                            # and not a rescan on every poll
    a.create("new", "alice", spec=PT, tensors=vt(9))       # writes generation 1 of a new epoch
    assert json.loads((a.root / "generation.json").read_text())["generation"] == 1
    assert b.refresh() is True and "new" in {r.id for r in b.list(None)}
    a.delete("t0", "alice")
    assert b.refresh() is True and "t0" not in {r.id for r in b.list(None)}


def _enospc(*_a, **_k):
    import errno
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_is_storage_full_and_publishes_nothing(make_store, monkeypatch):
    from prompt_store import disk as disk_mod
    from prompt_store import format as format_mod
    from prompt_store.errors import StorageFull
    s = make_store()
    s.create("t", "alice", spec=PT, tensors=vt(1))
    for module in (format_mod, disk_mod):  # the artifact's files, and the tombstone
        monkeypatch.setattr(module, "write_durably", _enospc)
    with pytest.raises(StorageFull, match="no space left") as e:
        s.create("t", "alice", spec=PT, tensors=vt(2))
    assert e.value.status == 507
    with pytest.raises(StorageFull):
        s.delete("t", "alice")
    monkeypatch.undo()
    assert [r.key for r in s.versions("t", None)] == ["t@1"] and not list((s.root / "tmp").iterdir())
    assert s.create("t", "alice", spec=PT, tensors=vt(2)).key == "t@2"


def test_failed_generation_bump_does_not_fail_a_published_upload(make_store, monkeypatch):
    from prompt_store import disk as disk_mod
    s = make_store()
    real = disk_mod.write_json_atomic

    def no_generation(path, *a, **k):
        if path.name == "generation.json":
            _enospc()
        return real(path, *a, **k)

    monkeypatch.setattr(disk_mod, "write_json_atomic", no_generation)
    assert s.create("t", "alice", spec=PT, tensors=vt(1)).key == "t@1"
    assert PromptStore(s.root, s.fingerprint).get("t", None).key == "t@1"


def test_restart_removes_a_dead_process_extraction_dir(make_store):
    s = make_store()
    code = ("import os, sys, pathlib, tempfile; from prompt_store.archive import extract_archive; "
            "import zipfile, io; b = io.BytesIO(); z = zipfile.ZipFile(b, 'w'); "
            "z.writestr('adapter_config.json', '{}'); z.close(); "
            "extract_archive(b.getvalue(), pathlib.Path(sys.argv[1])); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(s.root / "tmp")], cwd=REPO, check=True, timeout=120)
    debris = list((s.root / "tmp").iterdir())
    assert len(debris) == 1 and debris[0].name.startswith("upload-")
    PromptStore(s.root, s.fingerprint)
    assert not list((s.root / "tmp").iterdir())
