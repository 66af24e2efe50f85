"""Hostile input, by hand: each is a clear 4xx in the one error shape, and nothing is left on disk.

Inputs: huge and empty, invalid UTF-8, lone surrogates, max_new_tokens 0 / negative / huge, temperature negative /
NaN / Infinity (JSON literals), stop lists with thousands of entries; uploads that are truncated archives, zip and
gzip bombs, archives with ../ or absolute paths or symlinks, tensors of the wrong dtype or with NaN, unparseable
safetensors headers. After every refused upload the store tree and the server's temp dir are exactly as before.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save

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

LABELS = [{"name": "yes", "verbalizer": " yes"}, {"name": "no", "verbalizer": " no"}]
NATIVE_ENDPOINTS = ("/v1/tasks/qa/generate", "/v1/tasks/cls/classify")


@pytest.fixture(scope="module")
def server(module_tmp):
    with private_tempdir(module_tmp / "server-tmp"), \
            live_server(module_tmp, max_new_tokens=16, max_input_tokens=256, max_upload_bytes=2 << 20) as s:
        with s.client(ACME) as c:
            assert hard_task(c, "qa").status_code == 201
            assert hard_task(c, "cls", "Review: {input}\nAnswer:", labels=["yes", "no"]).status_code == 201
            assert upload(c, "soft", pack(native_soft_prompt("prompt_tuning", T=2))).status_code == 201
        yield s


@pytest.fixture
def acme(server):
    with server.client(ACME) as c:
        yield c


@pytest.fixture
def disk(server, module_tmp):
    watch = DiskWatch(server.runtime.settings.store, module_tmp / "server-tmp")
    yield watch
    watch.assert_unchanged()
    server.wait_idle()


def raw_post(c, path: str, body: bytes, ctype: str = "application/json"):
    return c.post(path, content=body, headers={"Content-Type": ctype})


# ---- sizes

def test_empty_bodies_and_inputs(acme, disk):
    for path in (*NATIVE_ENDPOINTS, "/v1/completions", "/v1/chat/completions", "/v1/tasks"):
        assert_error(raw_post(acme, path, b""), 422, "invalid_request")
        assert_error(acme.post(path, json={}), 422, "invalid_request")
    assert_error(acme.post("/v1/tasks/cls/classify", json={"input": []}), 422, "invalid_request")
    # an empty input is a valid request: a complete answer, not an error
    r = acme.post("/v1/tasks/qa/generate", json={"input": "", "max_new_tokens": 2})
    assert r.status_code == 200 and r.json()["finish_reason"] in ("stop", "length"), r.text
    r = acme.post("/v1/tasks/cls/classify", json={"input": ""})
    assert r.status_code == 200 and abs(sum(r.json()["scores"].values()) - 1) < 1e-4, r.text


def test_huge_inputs(acme, disk):
    over_tokens = "word " * 2_000                 # ~2,000 tokens > --max-input-tokens 256
    assert_error(acme.post("/v1/tasks/qa/generate", json={"input": over_tokens}), 413, "input_too_long")
    assert_error(acme.post("/v1/tasks/cls/classify", json={"input": [over_tokens] * 3}), 413, "input_too_long")
    assert_error(acme.post("/v1/completions", json={"model": "qa", "prompt": over_tokens}), 413)
    assert_error(acme.post("/v1/chat/completions", json={"model": "qa", "messages": [
        {"role": "user", "content": over_tokens}]}), 413)
    over_chars = "x" * 1_000_001                  # past the schema's character cap: refused before tokenizing
    for path in NATIVE_ENDPOINTS:
        assert_error(acme.post(path, json={"input": over_chars}), 422, "invalid_request")
    err = assert_error(acme.post("/v1/tasks/cls/classify", json={"input": ["x"] * 65}), 422, "invalid_request")
    assert err["message"] == "body.input: List should have at most 64 items after validation, not 65"  # no str noise
    err = assert_error(acme.post("/v1/completions", json={"model": "qa", "prompt": ["x", 3]}), 422)
    assert err["message"] == "body.prompt.1: Input should be a valid string"
    assert_error(acme.post("/v1/chat/completions", json={"model": "qa", "messages": [
        {"role": "user", "content": "x"}] * 257}), 422, "invalid_request")
    assert_error(hard_task(acme, "big", "{input}" + "x" * 20_001), 422, "invalid_request")


# ---- encodings

@pytest.mark.parametrize("body", [b'{"input": "\xff\xfe\xfd"}', b'{"input": "caf\xe9"}',
                                  b'\x00\x00\x00{', b'{"input": "x"'])
def test_invalid_utf8_and_malformed_json(acme, disk, body):
    for path in NATIVE_ENDPOINTS:
        assert_error(raw_post(acme, path, body), 422, "invalid_request")
    assert_error(raw_post(acme, "/v1/completions", body.replace(b'"input"', b'"model":"qa","prompt"')), 422)
    assert_error(raw_post(acme, "/v1/tasks", body.replace(b'"input"', b'"task_id":"u8","template"')), 422)


def test_invalid_utf8_in_multipart_fields(acme, disk):
    archive = pack(native_soft_prompt("prompt_tuning", T=2))
    boundary = "b0undary"
    parts = [(b'name="task_id"', b"bad\xff\xfeid"), (b'name="metadata"', b'{"description": "\xff"}'),
             (b'name="adapter"; filename="a.zip"', archive)]
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + h + b"\r\n\r\n" + v + b"\r\n"
                    for h, v in parts) + b"--" + boundary.encode() + b"--\r\n"
    r = raw_post(acme, "/v1/tasks", body, f"multipart/form-data; boundary={boundary}")
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)


def test_lone_surrogates_in_text_are_served_or_refused_never_a_500(acme, disk):
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 encoder accepts."""
    body = b'{"input": "a\\ud800b", "max_new_tokens": 2}'
    for path in NATIVE_ENDPOINTS:
        r = raw_post(acme, path, body.replace(b', "max_new_tokens": 2', b"") if "classify" in path else body)
        assert r.status_code in (200, 422), (path, r.status_code, r.text)
        if r.status_code == 422:
            assert_error(r, 422, "invalid_request")
    r = raw_post(acme, "/v1/completions", b'{"model": "qa", "prompt": "a\\udc00", "max_tokens": 2}')
    assert r.status_code in (200, 422), r.text
    r = raw_post(acme, "/v1/tasks", b'{"task_id": "sur", "kind": "hard", "template": "\\ud800 {input}"}')
    assert r.status_code in (201, 422), r.text


# ---- sampling fields

@pytest.mark.parametrize("value,status", [(0, 422), (-1, 422), (-(2 ** 63), 422), (17, 413), (10 ** 6, 413),
                                          (2 ** 64, 413), (10 ** 40, 413), (1.5, 422), ("8", 200)])
def test_max_new_tokens(acme, disk, value, status):
    r = acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": value})
    if status == 200:
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16, r.text
    else:
        assert 400 <= r.status_code < 500 and r.status_code in (status, 422), (value, r.status_code, r.text)
        assert_error(r, r.status_code)
    r = acme.post("/v1/completions", json={"model": "qa", "prompt": "x", "max_tokens": value})
    assert r.status_code < 500, (value, r.status_code, r.text)
    if r.status_code >= 400:
        assert_error(r, r.status_code)


def test_leaving_out_max_new_tokens_works_under_a_low_server_cap(acme, disk):
    r = acme.post("/v1/tasks/qa/generate", json={"input": "x"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16, r.text


def test_top_k_up_to_int64_is_served(acme, disk):
    for k in (49_153, 10 ** 6, 2 ** 63 - 1):  # more than the vocabulary: the same as no top-k
        r = acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 2, "top_k": k,
                                                     "temperature": 0.8, "seed": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("k", [2 ** 63, 2 ** 70])
def test_top_k_beyond_int64_is_a_4xx_not_a_500(acme, disk, k):
    r = acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 2, "top_k": k})
    assert 400 <= r.status_code < 500, r.text
    assert_error(r, r.status_code)
    r = hard_task(acme, f"topk-{k}", generation={"top_k": k})  # as a task default it would fail every request
    if r.status_code == 201:
        assert acme.delete(f"/v1/tasks/topk-{k}").status_code == 204
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"-1", b"-0.0001", b"1e309", b"-1e309"])
def test_temperature_and_top_p_non_finite_or_negative(acme, disk, literal):
    """Python's json (FastAPI's parser) accepts NaN and Infinity literals; the fields must still refuse them."""
    for field in (b"temperature", b"top_p"):
        body = b'{"input": "x", "max_new_tokens": 2, "' + field + b'": ' + literal + b"}"
        assert_error(raw_post(acme, "/v1/tasks/qa/generate", body), 422, "invalid_request")
        body = b'{"model": "qa", "prompt": "x", "max_tokens": 2, "' + field + b'": ' + literal + b"}"
        assert_error(raw_post(acme, "/v1/completions", body), 422, "invalid_request")
        body = (b'{"model": "qa", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "' + field
                + b'": ' + literal + b"}")
        assert_error(raw_post(acme, "/v1/chat/completions", body), 422, "invalid_request")
    # and as a task's stored generation default
    body = b'{"task_id": "nan-default", "kind": "hard", "template": "{input}", "generation": {"temperature": ' \
           + literal + b"}}"
    assert_error(raw_post(acme, "/v1/tasks", body), 422, "invalid_request")


def test_stop_lists_with_thousands_of_entries(acme, disk):
    stops = [f"s{i}" for i in range(5_000)]
    assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "x", "stop": stops}), 422, "invalid_request")
    assert_error(acme.post("/v1/completions", json={"model": "qa", "prompt": "x", "stop": stops}), 422)
    assert_error(acme.post("/v1/chat/completions", json={"model": "qa", "stop": stops, "messages": [
        {"role": "user", "content": "x"}]}), 422)
    assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "x", "stop": ["x" * 100_000]}), 422)
    assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "x", "stop": [""]}), 422)
    assert_error(hard_task(acme, "many-stops", generation={"stop": stops}), 422, "invalid_request")
    r = acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 4, "stop": ["z" * 256] * 16})
    assert r.status_code == 200, r.text


# ---- uploads

def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _good_files() -> dict[str, bytes]:
    return native_soft_prompt("prompt_tuning", T=2, seed=5)


def _refused(acme, archive: bytes, status: int | tuple = 422, filename: str = "a.zip", task: str = "hostile") -> str:
    r = upload(acme, task, archive, filename=filename)
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    err = assert_error(r, r.status_code)
    assert acme.get(f"/v1/tasks/{task}").status_code == 404
    return err["message"]


def test_truncated_archives(acme, disk):
    for fmt in ("zip", "tar.gz"):
        whole = pack(_good_files(), fmt)
        for cut in (10, len(whole) // 2, len(whole) - 30):
            _refused(acme, whole[:cut], filename=f"a.{fmt}")
    _refused(acme, b"", (422,))
    _refused(acme, b"PK\x03\x04" + b"\x00" * 100)
    _refused(acme, b"\x1f\x8b" + b"\xff" * 100, filename="a.tar.gz")
    _refused(acme, b"not an archive at all")


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """~0.4 MB that inflates to 400 MB of zeros: under the old fixed 512 MiB cap, far past any valid adapter."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("adapter/prompt.safetensors", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(400):
                f.write(chunk)
        zf.writestr("adapter/task.json", _good_files()["task.json"])
    return buf.getvalue()


def test_zip_bomb_and_many_files(server, acme, disk, zip_bomb):
    """Within the 2 MiB upload limit, 400 MB of zeros: refused before or while extracting, once past what a valid
    adapter for this model can be (~50 MB for the default model: 512 virtual tokens of a prefix in float64), not
    after writing up to 512 MiB to the store's tmp."""
    from prompt_store.archive import limits_for_model

    assert len(zip_bomb) < 2 << 20
    limits = limits_for_model(server.runtime.store.fingerprint, 512, 2 << 20)
    assert limits.max_total_bytes < 64 << 20
    message = _refused(acme, zip_bomb, 413)
    assert f"at most {limits.max_total_bytes} bytes" in message or f"at most {limits.max_file_bytes} bytes" in message
    many = _zip([(f"adapter/f{i}.txt", b"x") for i in range(200)] + [(f"adapter/{k}", v) for k, v in
                                                                     _good_files().items()])
    _refused(acme, many, 413)


def test_tar_bomb_declared_size(acme, disk):
    """A tar.gz member that declares 600 MB (the body is cut short): refused on the declared size, nothing written."""
    info = tarfile.TarInfo("adapter/prompt.safetensors")
    info.size = 600 << 20
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    import gzip
    bomb = gzip.compress(header + bytes(1 << 20))
    _refused(acme, bomb, (413, 422), filename="a.tar.gz")


def test_traversal_absolute_and_links(acme, disk):
    files = _good_files()
    for evil in ("../evil.txt", "adapter/../../evil.txt", "/etc/evil.txt", "adapter/..\\..\\evil.txt", "C:/evil"):
        _refused(acme, _zip([(f"adapter/{k}", v) for k, v in files.items()] + [(evil, b"pwned")]))
    link = zipfile.ZipInfo("adapter/prompt.safetensors")
    link.external_attr = (0o120777 << 16)
    _refused(acme, _zip([(link, b"/etc/passwd"), ("adapter/task.json", files["task.json"])]))
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info = tarfile.TarInfo("adapter/prompt.safetensors")
        info.type, info.linkname = kind, "/etc/passwd"
        meta = tarfile.TarInfo("adapter/task.json")
        meta.size = len(files["task.json"])
        _refused(acme, _tar([(meta, files["task.json"]), (info, None)]), filename="a.tar.gz")
    dev = tarfile.TarInfo("adapter/prompt.safetensors")
    dev.type = tarfile.CHRTYPE
    _refused(acme, _tar([(dev, None)]), filename="a.tar.gz")
    outside = disk.store_root.parent / "evil.txt"
    assert not outside.exists() and not (disk.store_root / "evil.txt").exists()


def _with_tensor(tensor: torch.Tensor) -> bytes:
    files = _good_files()
    files["prompt.safetensors"] = st_save({"virtual": tensor.contiguous()})
    manifest = json.loads(files["task.json"])
    manifest["tensors_sha256"] = __import__("hashlib").sha256(files["prompt.safetensors"]).hexdigest()
    files["task.json"] = json.dumps(manifest).encode()
    return pack(files)


def test_tensors_wrong_dtype_shape_nan(acme, disk):
    good = torch.randn(2, 576) * 0.05
    bad_values = good.clone()
    bad_values[0, 3] = float("nan")
    inf_values = good.clone()
    inf_values[1, 0] = float("inf")
    for tensor, word in ((good.to(torch.int32), "dtype"), (good.to(torch.bool), "dtype"), (bad_values, "finite"),
                         (inf_values, "finite"), (torch.randn(2, 575), "shape"), (torch.randn(2, 576, 1), "shape"),
                         (torch.randn(0, 576), "")):
        message = _refused(acme, _with_tensor(tensor))
        assert word in message, message


def test_safetensors_with_a_lying_header(acme, disk):
    files = _good_files()
    for blob in (struct.pack("<Q", 1 << 60) + b"{}", struct.pack("<Q", 10) + b"{not json}", b"\x00" * 3,
                 struct.pack("<Q", 2) + b"{}" + b"\x00" * 8):
        manifest = json.loads(files["task.json"])
        manifest["tensors_sha256"] = __import__("hashlib").sha256(blob).hexdigest()
        _refused(acme, pack({"task.json": json.dumps(manifest).encode(), "prompt.safetensors": blob}))
    peft = {"adapter_config.json": json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                               "task_type": "CAUSAL_LM", "token_dim": 576}).encode(),
            "adapter_model.safetensors": struct.pack("<Q", 1 << 40) + b"{"}
    _refused(acme, pack(peft))


def test_metadata_that_is_not_json_or_not_an_object(acme, disk):
    archive = pack(_good_files())
    for meta in ("{", "[]", "null", '"x"', '{"visibility": "everyone"}', '{"template": "no slot"}',
                 '{"labels": {"a": ""}}', '{"unknown": 1}', "NaN"):
        r = acme.post("/v1/tasks", data={"task_id": "meta", "metadata": meta},
                      files={"adapter": ("a.zip", archive, "application/zip")})
        assert_error(r, 422, "invalid_request")
    assert acme.get("/v1/tasks/meta").status_code == 404
