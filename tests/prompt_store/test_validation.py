"""Every rejection on the way in names what was expected and what was found."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from prompt_core.spec import PromptKind, PromptSpec, PromptTensors
from prompt_store.errors import InvalidPrompt, PayloadTooLarge, StoreError, TaskNotFound
from prompt_store.format import TaskManifest, read_artifact, write_artifact
from prompt_store.validate import check_task_id, parse_ref

from .conftest import rand_virtual

# tiny model: hidden 64, 2 layers, 4 heads, 2 KV heads, head dim 16


def _create(store, spec, tensors, task_id="t"):
    return store.create(task_id, "alice", spec=spec, tensors=tensors)


@pytest.mark.parametrize("shape,pattern", [
    ((4, 65), r"expected shape \[4, 64\], found \[4, 65\].*hidden size expected 64 found 65"),
    ((5, 64), r"expected shape \[4, 64\], found \[5, 64\]"),
    ((4, 64, 1), r"rank expected 2, found 3"),
])
def test_virtual_shape(make_store, shape, pattern):
    with pytest.raises(InvalidPrompt, match=pattern):
        _create(make_store(), PromptSpec("prompt_tuning", 4), PromptTensors(virtual=torch.zeros(shape)))


@pytest.mark.parametrize("shape,what", [
    ((3, 2, 2, 4, 16), "layers expected 2 found 3"),
    ((2, 2, 4, 4, 16), "KV heads expected 2 found 4"),
    ((2, 2, 2, 4, 8), "head dim expected 16 found 8"),
])
def test_prefix_shape(make_store, shape, what):
    with pytest.raises(InvalidPrompt, match=what):
        _create(make_store(), PromptSpec("prefix_tuning", 4), PromptTensors(prefix=torch.zeros(shape)))


def test_non_finite(make_store):
    v = rand_virtual()
    v[1, 3] = float("nan")
    v[2, 0] = float("inf")
    with pytest.raises(InvalidPrompt, match="expected only finite values, found 2 NaN/inf"):
        _create(make_store(), PromptSpec("prompt_tuning", 4), PromptTensors(virtual=v))


def test_too_many_virtual_tokens(make_store):
    with pytest.raises(InvalidPrompt, match="num_virtual_tokens expected at most 8, found 9"):
        _create(make_store(max_virtual_tokens=8), PromptSpec("p_tuning", 9),
                PromptTensors(virtual=rand_virtual(9)))


def test_wrong_dtype(make_store, tmp_path, tiny_fp):
    with pytest.raises(InvalidPrompt, match="floating dtype"):
        _create(make_store(), PromptSpec("prompt_tuning", 4),
                PromptTensors(virtual=torch.zeros(4, 64, dtype=torch.int32)))
    # a native artifact holding fp16 instead of fp32
    m = write_artifact(tmp_path / "a", _manifest(tiny_fp), PromptTensors(virtual=rand_virtual()))
    save_file({"virtual": rand_virtual().half()}, tmp_path / "a" / "prompt.safetensors")
    _rewrite(tmp_path / "a", tensors_sha256=None)
    with pytest.raises(InvalidPrompt, match="expected dtype float32, found float16"):
        make_store().create("t", "alice", source_dir=tmp_path / "a")
    assert m.tensors_sha256


def _manifest(fp, **kw) -> TaskManifest:
    base = dict(id="x", version=1, tenant="", visibility="private", kind="prompt_tuning", num_virtual_tokens=4,
                template="{input}", fingerprint=fp.to_dict())
    base.update(kw)
    return TaskManifest(**base)


def _rewrite(directory, **fields):
    data = json.loads((directory / "task.json").read_text())
    data.update(fields)
    (directory / "task.json").write_text(json.dumps(data))


def test_upload_with_wrong_checksum_is_invalid(make_store, tmp_path, tiny_fp):
    write_artifact(tmp_path / "a", _manifest(tiny_fp), PromptTensors(virtual=rand_virtual()))
    _rewrite(tmp_path / "a", tensors_sha256="ab" * 32)
    with pytest.raises(InvalidPrompt, match=f"sha256 mismatch, expected {'ab' * 32}"):
        make_store().create("t", "alice", source_dir=tmp_path / "a")


def test_file_too_large(make_store, tmp_path, tiny_fp):
    write_artifact(tmp_path / "a", _manifest(tiny_fp), PromptTensors(virtual=rand_virtual()))
    store = make_store(max_file_bytes=500)
    with pytest.raises(PayloadTooLarge, match=r"prompt.safetensors: expected at most 500 bytes, found \d+"):
        store.create("t", "alice", source_dir=tmp_path / "a")
    assert PayloadTooLarge.status == 413


def test_fingerprint_mismatch(make_store, tmp_path, tiny_fp):
    other = dataclasses.replace(tiny_fp, embedding_sha256="0" * 64, num_layers=30)
    write_artifact(tmp_path / "a", _manifest(other), PromptTensors(virtual=rand_virtual()))
    with pytest.raises(InvalidPrompt, match=r"another base model.*num_layers: expected 2, found 30.*embedding_sha256"):
        make_store().create("t", "alice", source_dir=tmp_path / "a")


def test_unknown_kind(make_store, tmp_path, tiny_fp):
    write_artifact(tmp_path / "a", _manifest(tiny_fp), PromptTensors(virtual=rand_virtual()))
    _rewrite(tmp_path / "a", kind="lora")
    with pytest.raises(InvalidPrompt, match=r"'kind': expected one of \['hard', 'prompt_tuning', 'p_tuning', "
                                            r"'prefix_tuning'\], found 'lora'"):
        make_store().create("t", "alice", source_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown prompt kind"):
        PromptSpec("lora", 4)


def test_manifest_field_errors(tiny_fp):
    good = _manifest(tiny_fp).to_dict()
    assert TaskManifest.from_dict(good) == _manifest(tiny_fp, created_at=good["created_at"])
    for bad, pattern in [({"version": 0}, "'version': expected an integer >= 1, found 0"),
                         ({"visibility": "secret"}, "'visibility': expected one of"),
                         ({"extra": 1}, r"unknown fields \['extra'\]"),
                         ({"template": "no slot"}, "exactly one {input} slot"),
                         ({"task_type": "classify"}, "'classify' exactly when labels are given"),
                         ({"format": 2}, "'format': expected 1, found 2")]:
        with pytest.raises(InvalidPrompt, match=pattern):
            TaskManifest.from_dict({**good, **bad})
    with pytest.raises(InvalidPrompt, match="missing required fields"):
        TaskManifest.from_dict({"id": "x"})


def test_tensor_kind_mismatch(make_store):
    with pytest.raises(InvalidPrompt, match="expected a 'prefix' tensor"):
        _create(make_store(), PromptSpec("prefix_tuning", 4), PromptTensors(virtual=rand_virtual()))
    with pytest.raises(InvalidPrompt, match="hard prompt expected no tensors"):
        _create(make_store(), PromptSpec("hard", 0, "Q: {input}"), PromptTensors(virtual=rand_virtual()))


def test_corrupt_artifact_checksum(tmp_path, tiny_fp):
    write_artifact(tmp_path / "a", _manifest(tiny_fp), PromptTensors(virtual=rand_virtual()))
    p = tmp_path / "a" / "prompt.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="sha256 mismatch"):
        read_artifact(tmp_path / "a")


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a\\b", ".hidden", "a..b", "x" * 129, "é", "a b", "a@1",
                                 "-x"])
def test_bad_task_ids(make_store, bad):
    with pytest.raises(InvalidPrompt, match="task id expected to match"):
        check_task_id(bad)
    with pytest.raises(InvalidPrompt):
        make_store().create(bad, "alice", spec=PromptSpec("hard", 0, "{input}"))


def test_refs():
    assert parse_ref("sent") == ("sent", None)
    assert parse_ref("sent.v2_x-y@12") == ("sent.v2_x-y", 12)
    for bad in ["sent@", "sent@0", "sent@-1", "sent@x", "../x@1", "sent@1@2"]:
        with pytest.raises(InvalidPrompt):
            parse_ref(bad)


def test_errors_carry_http_status():
    from prompt_store.errors import Forbidden, QuotaExceeded
    assert [c.status for c in (InvalidPrompt, TaskNotFound, PayloadTooLarge, QuotaExceeded, Forbidden)] == \
        [422, 404, 413, 429, 403]
    assert issubclass(TaskNotFound, StoreError) and issubclass(StoreError, Exception)


def test_hard_prompt_roundtrip(tmp_path):
    m = TaskManifest(id="h", version=1, tenant="", visibility="public", kind=PromptKind.HARD.value,
                     num_virtual_tokens=0, template="Translate: {input}", labels=[{"name": "a", "verbalizer": " a"}],
                     task_type="classify")
    written = write_artifact(tmp_path / "h", m, None)
    assert written.tensors_sha256 is None and not (tmp_path / "h" / "prompt.safetensors").exists()
    back, tensors = read_artifact(tmp_path / "h")
    assert back == written and tensors is None
    assert back.spec().labels[0].verbalizer == " a"
