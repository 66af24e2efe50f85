"""Security rules, each tested for its behaviour (not by reading the code):

- tenant isolation: what tests/server/api/test_tenants.py does not already cover — delete, pinned versions (`id@1`),
  streams and lists on the OpenAI endpoints, and that every 404 for another tenant's private task is byte-for-byte
  the 404 of a task that does not exist (no existence oracle in status or message);
- keys: a sha256-stored key works, the stored digest itself does not, near-misses do not, every request compares
  against every entry with hmac.compare_digest (same count whichever key, or none, matches), no plaintext kept;
- limits: upload size (declared and chunked bodies) and tasks per tenant;
- logs: no request texts and no tensor values unless --log-requests, and with it the texts do appear;
- CORS: off by default (no Access-Control-Allow-Origin on a preflight or a simple request);
- pickle: never loaded — an upload whose unpickling would create a marker file is refused and no marker appears.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import pickle
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

import server.auth as auth_mod

from .conftest import (
    ACME,
    ADMIN,
    GLOBEX,
    METERED,
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
MAX_UPLOAD = 256 << 10
SECRET_VALUE = 0.123456789  # a tensor value that must never reach a log


@pytest.fixture(scope="module")
def server(module_tmp):
    with private_tempdir(module_tmp / "server-tmp"), \
            live_server(module_tmp, max_upload_bytes=MAX_UPLOAD, max_tasks_per_tenant=3, max_new_tokens=64) as s:
        soft = pack(native_soft_prompt("prompt_tuning", T=2, seed=3, labels=LABELS))
        with s.client(ACME) as acme, s.client(GLOBEX) as globex:
            for client, task, visibility in ((acme, "acme-own", "private"), (globex, "globex-private", "private"),
                                             (globex, "globex-public", "public")):
                assert upload(client, task, soft, {"visibility": visibility}).status_code == 201
        yield s


@pytest.fixture
def acme(server):
    with server.client(ACME) as c:
        yield c


# ---- tenant isolation

CHAT = [{"role": "user", "content": "x"}]


def ops(task: str) -> dict[str, tuple[str, str, dict | None, dict | None]]:
    """op -> (method, path, json body, query) addressing `task` (an id or id@version)."""
    bare = task.split("@")[0]
    return {
        "read": ("GET", f"/v1/tasks/{task}", None, None),
        "versions": ("GET", f"/v1/tasks/{bare}/versions", None, None),
        "export_zip": ("GET", f"/v1/tasks/{task}/export", None, {"format": "zip"}),
        "export_native_tar": ("GET", f"/v1/tasks/{task}/export", None, {"format": "tar.gz", "layout": "native"}),
        "generate": ("POST", f"/v1/tasks/{task}/generate", {"input": "x", "max_new_tokens": 1}, None),
        "generate_sse": ("POST", f"/v1/tasks/{task}/generate", {"input": "x", "max_new_tokens": 1, "stream": True},
                         None),
        "classify": ("POST", f"/v1/tasks/{task}/classify", {"input": "x"}, None),
        "classify_list": ("POST", f"/v1/tasks/{task}/classify", {"input": ["x", "y"]}, None),
        "completions": ("POST", "/v1/completions", {"model": task, "prompt": "x", "max_tokens": 1}, None),
        "completions_list_stream": ("POST", "/v1/completions", {"model": task, "prompt": ["x", "y"], "max_tokens": 1,
                                                                 "stream": True}, None),
        "chat": ("POST", "/v1/chat/completions", {"model": task, "messages": CHAT, "max_tokens": 1}, None),
        "chat_stream": ("POST", "/v1/chat/completions", {"model": task, "messages": CHAT, "max_tokens": 1,
                                                         "stream": True}, None),
        "model": ("GET", f"/v1/models/{task}", None, None),
        "delete": ("DELETE", f"/v1/tasks/{bare}", None, None),
        "new_version": ("POST", "/v1/tasks", {"task_id": bare, "kind": "hard", "template": "{input}"}, None),
    }


def send(c: httpx.Client, op: tuple) -> httpx.Response:
    method, path, body, query = op
    return c.request(method, path, json=body, params=query)


@pytest.mark.parametrize("ref", ["globex-private", "globex-private@1"])
def test_another_tenants_private_task_is_a_404_identical_to_a_missing_one(acme, ref):
    missing = ref.replace("globex-private", "nothing-here")
    hidden_ops, missing_ops = ops(ref), ops(missing)
    for name in hidden_ops:
        if name == "new_version":  # creating either id works alike (test below)
            continue
        hidden, absent = send(acme, hidden_ops[name]), send(acme, missing_ops[name])
        assert_error(hidden, 404, "not_found")
        assert absent.status_code == 404, (name, absent.text)
        assert hidden.json()["error"]["message"].replace("globex-private", "nothing-here") == \
            absent.json()["error"]["message"], name
        assert set(hidden.headers) - {"date", "content-length"} == set(absent.headers) - {"date", "content-length"}
    # still there, untouched, for its owner
    with httpx.Client(base_url=str(acme.base_url), headers={"Authorization": f"Bearer {GLOBEX}"}) as globex:
        assert globex.get("/v1/tasks/globex-private").json()["version"] == 1
        assert [v["version"] for v in globex.get("/v1/tasks/globex-private/versions").json()["data"]] == [1]


def test_reusing_another_tenants_private_id_answers_as_for_a_free_one(acme, server):
    """Creating an id that another tenant holds privately looks exactly like creating a free id (201, the same body
    and headers, version 1): the caller gets its own task of that name, and the other tenant's is untouched."""
    fresh = send(acme, ops("free-id")["new_version"])
    reused = send(acme, ops("globex-private")["new_version"])
    assert fresh.status_code == reused.status_code == 201, reused.text
    strip = lambda body: {k: v for k, v in body.items() if k not in ("id", "created_at")}  # noqa: E731
    assert strip(reused.json()) == strip(fresh.json()) and reused.json()["id"] == "globex-private"
    assert reused.headers["location"] == "/v1/tasks/globex-private@1"
    assert set(reused.headers) == set(fresh.headers)
    mine = acme.post("/v1/tasks/globex-private/generate", json={"input": "x", "max_new_tokens": 1}).json()
    assert mine["task"] == "globex-private@1"  # never the storage name
    theirs = server.runtime.store.get("globex-private", "globex")
    assert theirs.tenant == "globex" and theirs.version == 1 and theirs.kind == "prompt_tuning"
    with server.client(GLOBEX) as globex:
        assert globex.get("/v1/tasks/globex-private").json()["kind"] == "prompt_tuning"
        assert [t["id"] for t in globex.get("/v1/tasks").json()["data"]].count("globex-private") == 1
    assert acme.get("/v1/tasks/globex-private").json()["kind"] == "hard"
    assert [t["id"] for t in acme.get("/v1/tasks").json()["data"]].count("globex-private") == 1
    # deleting its own copy leaves the other tenant's task alone, and the id answers 404 to it again
    assert acme.delete("/v1/tasks/globex-private").status_code == 204
    assert_error(acme.get("/v1/tasks/globex-private"), 404, "not_found")
    assert server.runtime.store.get("globex-private", "globex").version == 1
    assert acme.delete("/v1/tasks/free-id").status_code == 204


def test_lists_never_show_another_tenants_private_task(acme, server):
    for path in ("/v1/tasks", "/v1/models"):
        ids = {t["id"] for t in acme.get(path).json()["data"]}
        assert "globex-private" not in ids and {"acme-own", "globex-public"} <= ids
    with server.client(GLOBEX) as globex:
        assert send(globex, ops("acme-own")["delete"]).status_code == 404
        assert send(globex, ops("acme-own@1")["export_native_tar"]).status_code == 404
    assert acme.get("/v1/tasks/acme-own").status_code == 200
    with server.client(ADMIN) as admin:  # admins see every task
        assert "globex-private" in {t["id"] for t in admin.get("/v1/tasks").json()["data"]}


# ---- keys

def test_keys_plain_and_sha256_stored_work_and_near_misses_do_not(server):
    for key in (ACME, GLOBEX, ADMIN):  # GLOBEX and ADMIN are stored only as sha256 digests
        with server.client(key) as c:
            assert c.get("/v1/tasks").status_code == 200, key
    stored_form = "sha256:" + hashlib.sha256(GLOBEX.encode()).hexdigest()
    near = [stored_form, stored_form[7:], ACME[:-1], ACME + "x", ACME.upper(), ACME[:-1] + "\u0451",
            GLOBEX.replace("globex", "initech"), "a" * 10_000, "\ud800" * 3]
    for key in near:
        r = httpx.get(f"{server.url}/v1/tasks", headers={"Authorization": f"Bearer {key}".encode("utf-8",
                                                                                                  "surrogatepass")})
        assert_error(r, 401, "unauthorized")
    for header in ({"Authorization": f"Basic {ACME}"}, {"Authorization": "Bearer"}, {"Authorization": ACME},
                   {"X-Api-Key": ACME}, {}):
        assert_error(httpx.get(f"{server.url}/v1/tasks", headers=header), 401, "unauthorized")


def test_keys_are_kept_as_digests_and_compared_in_constant_time_against_every_entry(server, monkeypatch):
    ring = server.runtime.keyring
    assert ring.entries and all(isinstance(d, bytes) and len(d) == 32 for d, _ in ring.entries)
    for key in (ACME, GLOBEX, ADMIN, METERED):
        assert key.encode() not in b"".join(d for d, _ in ring.entries) and key not in repr(ring)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", counting)
    counts = {}
    for key in (ACME, METERED, "no-such-key-0123456789"):  # first entry, last entry, none
        calls.clear()
        httpx.get(f"{server.url}/v1/tasks", headers={"Authorization": f"Bearer {key}"})
        counts[key] = len(calls)
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never the raw key
    assert set(counts.values()) == {len(ring.entries)}, counts


# ---- limits

def test_upload_size_limit_declared_and_chunked(acme, server, module_tmp):
    watch = DiskWatch(server.runtime.settings.store, module_tmp / "server-tmp")
    big = pack({**native_soft_prompt("prompt_tuning", T=2), "padding.txt": torch.randn(MAX_UPLOAD // 2).numpy()
                .tobytes()}, fmt="zip")
    assert len(big) > MAX_UPLOAD
    assert_error(upload(acme, "too-big", big), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit must hold while streaming
        boundary = b"--xyz"
        yield boundary + b'\r\nContent-Disposition: form-data; name="task_id"\r\n\r\ntoo-big\r\n'
        yield boundary + b'\r\nContent-Disposition: form-data; name="adapter"; filename="a.zip"\r\n\r\n'
        for i in range(0, len(big), 16 << 10):
            yield big[i:i + (16 << 10)]
        yield b"\r\n" + boundary + b"--\r\n"

    try:
        r = acme.post("/v1/tasks", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        assert_error(r, 413, "payload_too_large")
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        pass  # the server may also cut the connection once over the limit; either way it is refused
    big_json = json.dumps({"task_id": "too-big", "kind": "hard", "template": "{input}" + " " * MAX_UPLOAD})
    assert_error(acme.post("/v1/tasks", content=big_json, headers={"Content-Type": "application/json"}), 413)
    assert acme.get("/v1/tasks/too-big").status_code == 404
    watch.assert_unchanged()


def test_tasks_per_tenant_limit(server):
    with server.client(METERED) as c:
        for i in range(3):
            assert hard_task(c, f"m{i}").status_code == 201
        assert_error(hard_task(c, "m3"), 429, "quota_exceeded")
        assert_error(upload(c, "m3", pack(native_soft_prompt("prompt_tuning", T=2))), 429, "quota_exceeded")
        assert hard_task(c, "m0").json()["version"] == 2  # a new version of an owned task is not a new task
        assert c.delete("/v1/tasks/m2").status_code == 204
        assert hard_task(c, "m3").status_code == 201  # room again after a delete
        assert {t["id"] for t in c.get("/v1/tasks").json()["data"]} >= {"m0", "m1", "m3"}


# ---- logs

class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")


@pytest.fixture
def captured():
    cap = Capture()
    root = logging.getLogger()
    names = ["", "server", "server.requests", "prompt_store", "uvicorn", "uvicorn.access", "uvicorn.error",
             "server.api.errors", "server.engine.engine"]
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.DEBUG)
    root.addHandler(cap)
    try:
        yield cap
    finally:
        root.removeHandler(cap)
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


def _traffic(c: httpx.Client, marker: str) -> None:
    assert c.post("/v1/tasks/secret-soft/generate", json={"input": f"{marker} gen", "max_new_tokens": 2}
                  ).status_code == 200
    with c.stream("POST", "/v1/tasks/secret-soft/generate",
                  json={"input": f"{marker} sse", "max_new_tokens": 2, "stream": True}) as r:
        r.read()
    assert c.post("/v1/tasks/secret-soft/classify", json={"input": [f"{marker} cls", "b"]}).status_code == 200
    assert c.post("/v1/completions", json={"model": "secret-soft", "prompt": f"{marker} cmp", "max_tokens": 2}
                  ).status_code == 200
    assert c.post("/v1/chat/completions", json={"model": "secret-soft", "max_tokens": 2, "messages": [
        {"role": "user", "content": f"{marker} chat"}]}).status_code == 200
    assert c.post("/v1/tasks/secret-soft/generate", json={"input": f"{marker} " * 3000}).status_code == 413
    assert c.post("/v1/tasks/secret-soft/generate", json={"input": marker, "temperature": -1}).status_code == 422


def test_logs_hold_no_request_texts_or_tensors_unless_enabled(server, captured):
    tensors = native_soft_prompt("prompt_tuning", T=2, seed=4, labels=LABELS)
    virtual = torch.full((2, 576), SECRET_VALUE)
    tensors["prompt.safetensors"] = st_save({"virtual": virtual})
    manifest = json.loads(tensors["task.json"])
    manifest["tensors_sha256"] = hashlib.sha256(tensors["prompt.safetensors"]).hexdigest()
    tensors["task.json"] = json.dumps(manifest).encode()
    marker = "ZEBRA-7f3a-PRIVATE-TEXT"
    with server.client(ACME) as c:
        assert upload(c, "secret-soft", pack(tensors), {"description": "desc"}).status_code == 201
        assert server.runtime.settings.log_requests is False  # the default
        _traffic(c, marker)
        text = "\n".join(captured.lines)
        assert captured.lines, "nothing was captured: the test would prove nothing"
        assert marker not in text
        assert "0.1234" not in text and "tensor(" not in text and "1.2346e-01" not in text
        try:  # the positive control: with --log-requests the same traffic does log the texts
            server.runtime.settings.log_requests = True
            _traffic(c, marker)
        finally:
            server.runtime.settings.log_requests = False
        logged = "\n".join(captured.lines)
        assert f"{marker} gen" in logged and f"{marker} chat" in logged
        assert "0.1234" not in logged and "tensor(" not in logged
        assert c.delete("/v1/tasks/secret-soft").status_code == 204
    server.wait_idle()


# ---- CORS

def test_cors_is_off_by_default(server):
    preflight = httpx.options(f"{server.url}/v1/tasks/acme-own/generate", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert not any(h.lower().startswith("access-control-") for h in preflight.headers), preflight.headers
    assert preflight.status_code >= 400
    simple = httpx.get(f"{server.url}/v1/tasks", headers={"Origin": "https://evil.example",
                                                          "Authorization": f"Bearer {ACME}"})
    assert simple.status_code == 200
    assert not any(h.lower().startswith("access-control-") for h in simple.headers), simple.headers


# ---- pickle

class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears iff something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_never_loaded(acme, server, module_tmp):
    marker = module_tmp / "PICKLE-WAS-LOADED"
    evil = pickle.dumps({"prompt_embeddings": Payload(marker)})
    assert not marker.exists()
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": Payload(marker)}, buf)  # torch's zip format, pickle inside
    evil_torch = buf.getvalue()
    cfg = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2,
                      "token_dim": 576, "num_transformer_submodules": 1, "num_attention_heads": 9,
                      "num_layers": 30, "base_model_name_or_path": "x"}).encode()
    native = native_soft_prompt("prompt_tuning", T=2, seed=8)
    cases = {
        "peft .bin": {"adapter_config.json": cfg, "adapter_model.bin": evil},
        "peft .bin (torch zip)": {"adapter_config.json": cfg, "adapter_model.bin": evil_torch},
        "pickle named .safetensors": {"adapter_config.json": cfg, "adapter_model.safetensors": evil},
        "torch zip named .safetensors": {"adapter_config.json": cfg, "adapter_model.safetensors": evil_torch},
        "native with a pickle tensor file": {"task.json": native["task.json"], "prompt.safetensors": evil},
        "a .pt beside a valid artifact": {**native, "extra.pt": evil_torch},
        "a .pkl beside a valid artifact": {**native, "extra.pkl": evil},
        "a .pth beside a valid adapter": {**native, "x.pth": evil_torch},
        "a .ckpt beside a valid adapter": {**native, "x.ckpt": evil_torch},
    }
    watch = DiskWatch(server.runtime.settings.store, module_tmp / "server-tmp")
    for name, files in cases.items():
        for fmt in ("zip", "tar.gz"):
            r = upload(acme, "pickled", pack(files, fmt), filename=f"a.{fmt}")
            assert 400 <= r.status_code < 500, (name, fmt, r.status_code, r.text)
            assert_error(r, r.status_code)
            assert not marker.exists(), f"{name} ({fmt}) was unpickled"
    assert acme.get("/v1/tasks/pickled").status_code == 404
    watch.assert_unchanged()
    assert not marker.exists()
    pickle.loads(evil)  # the control: the payload does create the marker when unpickled
    assert marker.exists()
