"""Uploaded archives: good PEFT and native archives import; every attack is refused and leaves nothing on disk."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import peft
import pytest
import torch

from prompt_core.spec import PromptTensors
from prompt_store.archive import ArchiveLimits, extract_archive, extracted
from prompt_store.errors import InvalidPrompt, PayloadTooLarge
from prompt_store.format import TaskManifest, write_artifact

from .conftest import rand_virtual
from .helpers import make_peft_config


def _zip(files: dict[str, bytes], infos: list[zipfile.ZipInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in infos or []:
            zf.writestr(info, data)
    return buf.getvalue()


def _tar(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return buf.getvalue()


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def peft_files(tmp_path, tiny):
    pm = peft.get_peft_model(tiny, make_peft_config("prefix_tuning", 3))
    pm.save_pretrained(tmp_path / "adapter")
    return _files(tmp_path / "adapter")


@pytest.fixture
def native_files(tmp_path, tiny_fp):
    m = TaskManifest(id="x", version=1, tenant="", visibility="private", kind="p_tuning", num_virtual_tokens=4,
                     template="<v:2> Review: {input} <v:2>", fingerprint=tiny_fp.to_dict())
    write_artifact(tmp_path / "native", m, PromptTensors(virtual=rand_virtual()))
    return _files(tmp_path / "native")


def _leftovers(store) -> list:
    return list((store.root / "tmp").iterdir())


@pytest.mark.parametrize("pack", [_zip, _tar])
@pytest.mark.parametrize("nested", [False, True])
def test_good_archives_import(make_store, peft_files, native_files, pack, nested):
    s = make_store()
    pre = "adapter/" if nested else ""
    r = s.create_from_archive("pre", "alice", pack({pre + k: v for k, v in peft_files.items()}), filename="a")
    assert r.kind == "prefix_tuning" and s.tensors(r).prefix.shape == (2, 2, 2, 3, 16)
    r = s.create_from_archive("nat", "alice", pack({pre + k: v for k, v in native_files.items()}),
                              metadata={"visibility": "public"})
    assert r.template == "<v:2> Review: {input} <v:2>" and r.visibility == "public"
    assert torch.equal(s.tensors(r).virtual, rand_virtual())
    assert not _leftovers(s)


def _refused(store, data: bytes, exc, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        store.create_from_archive("t", "alice", data, filename="upload")
    assert not _leftovers(store), "a refused archive left files behind"
    assert not store.list(None)


def test_path_traversal_and_absolute(make_store, peft_files):
    s = make_store()
    for name in ["../evil.txt", "adapter/../../evil.txt", "/etc/evil"]:
        for pack in (_zip, _tar):
            _refused(s, pack({**peft_files, name: b"x"}), InvalidPrompt, "relative path|inside the archive")
    assert not (s.root.parent / "evil.txt").exists()


def test_links_and_devices_in_tar(make_store, peft_files):
    s = make_store()
    sym = tarfile.TarInfo("adapter_model.safetensors")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _refused(s, _tar({"adapter_config.json": peft_files["adapter_config.json"]}, [sym]), InvalidPrompt,
             "found a symbolic link")
    hard = tarfile.TarInfo("x")
    hard.type, hard.linkname = tarfile.LNKTYPE, "adapter_config.json"
    _refused(s, _tar(peft_files, [hard]), InvalidPrompt, "found a hard link")
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.CHRTYPE
    _refused(s, _tar(peft_files, [dev]), InvalidPrompt, "found a special file")
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    _refused(s, _tar(peft_files, [fifo]), InvalidPrompt, "found a special file")


def test_symlink_in_zip(make_store, peft_files):
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    _refused(make_store(), _zip(peft_files, [(info, "/etc/passwd")]), InvalidPrompt, "found a symbolic link")


@pytest.mark.parametrize("pack", [_zip, _tar])
def test_bombs(make_store, peft_files, pack):
    s = make_store(archive=ArchiveLimits(max_total_bytes=1 << 20, max_file_bytes=1 << 20, max_files=8))
    bomb = pack({**peft_files, "zeros": b"\0" * (4 << 20)})
    assert len(bomb) < 64 << 10  # highly compressed
    _refused(s, bomb, PayloadTooLarge, "expected at most 1048576 bytes")
    many = pack({**peft_files, **{f"f{i}": b"x" for i in range(20)}})
    _refused(s, many, PayloadTooLarge, "expected at most 8 files")


def test_zip_that_lies_about_sizes(make_store, peft_files):
    """Headers claim a small file; the stream inflates to far more: counted while reading, not from headers."""
    data = bytearray(_zip({**peft_files, "zeros": b"\0" * (3 << 20)}))
    s = make_store(archive=ArchiveLimits(max_total_bytes=1 << 20, max_file_bytes=1 << 20))
    # patch the declared size of 'zeros' in the local and central headers to 100 bytes
    name = b"zeros"
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = data.find(sig)
        while i >= 0:
            nlen_off = 26 if sig == b"PK\x03\x04" else 28
            nlen = int.from_bytes(data[i + nlen_off:i + nlen_off + 2], "little")
            start = i + (30 if sig == b"PK\x03\x04" else 46)
            if bytes(data[start:start + nlen]) == name:
                data[i + off:i + off + 4] = (100).to_bytes(4, "little")
            i = data.find(sig, i + 4)
    with pytest.raises((PayloadTooLarge, InvalidPrompt)):
        s.create_from_archive("t", "alice", bytes(data))
    assert not _leftovers(s)


@pytest.mark.parametrize("pack", [_zip, _tar])
def test_truncated(make_store, peft_files, pack):
    data = pack(peft_files)
    _refused(make_store(), data[: len(data) // 2], InvalidPrompt, "corrupt or truncated")


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "weights.pth", "x.pkl"])
def test_pickles_refused(make_store, peft_files, name):
    for pack in (_zip, _tar):
        _refused(make_store(), pack({**peft_files, name: b"\x80\x04."}), InvalidPrompt,
                 "pickle-based checkpoints run arbitrary code")


def test_not_an_archive_and_no_artifact(make_store, tmp_path):
    s = make_store()
    _refused(s, b"hello world", InvalidPrompt, "expected a .zip or .tar.gz")
    _refused(s, _zip({"readme.txt": b"hi"}), InvalidPrompt, r"expected task.json .* or adapter_config.json")
    _refused(s, _zip({"a/x": b"1", "b/y": b"2"}), InvalidPrompt, "expected task.json")


def test_archive_size_cap_and_cleanup(tmp_path, peft_files):
    data = _zip(peft_files)
    with pytest.raises(PayloadTooLarge, match=f"expected at most 100 bytes, found {len(data)}"):
        extract_archive(data, tmp_path / "d", limits=ArchiveLimits(max_archive_bytes=100))
    with extracted(data, tmp_path / "d") as root:
        assert (root / "adapter_config.json").is_file()
    assert not list((tmp_path / "d").iterdir())


def test_duplicate_member(make_store, peft_files):
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate when writing
        data = _zip(peft_files, [(zipfile.ZipInfo("adapter_config.json"), b"{}")])
    _refused(make_store(), data, InvalidPrompt, "twice")


def test_disk_full_while_extracting_is_storage_full_not_corrupt(make_store, peft_files, monkeypatch):
    import errno

    from prompt_store import archive as archive_mod
    from prompt_store.errors import StorageFull

    class Full(io.BytesIO):
        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *a, **k):
        return Full() if "x" in mode or "w" in mode else open(path, mode, *a, **k)

    s = make_store()
    monkeypatch.setattr(archive_mod, "open", full_open, raising=False)
    with pytest.raises(StorageFull, match="no space left"):
        s.create_from_archive("t", "alice", _zip(peft_files))
    assert not _leftovers(s)
