"""Faults inside one server (thread-hosted, so faults can be injected and the engine inspected):

- a corrupt tensor file on disk fails only its own task, with a clear error, while other tasks in the same batch serve;
- disk full while an upload is written (a fault-injecting writer): an error in the one shape, nothing partial left,
  the previous version still serves, and the next upload works;
- an exception inside the engine for one request: that request fails alone, the rest of its batch completes with
  exactly the text it gets when nothing fails;
- a client that disconnects mid-stream frees its slot (engine running count and tenant in-flight back to 0).
"""

from __future__ import annotations

import errno
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import prompt_store.archive as archive_mod
import prompt_store.format as format_mod

from .conftest import (
    ACME,
    DiskWatch,
    assert_error,
    hard_task,
    live_server,
    native_soft_prompt,
    pack,
    private_tempdir,
    sse_events,
    upload,
)

LABELS = [{"name": "yes", "verbalizer": " yes"}, {"name": "no", "verbalizer": " no"}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
INPUTS = ("alpha", "beta", "gamma")
FAILING = "delta"  # one token, like INPUTS, so the engine's length grouping prefills it together with them


@pytest.fixture(scope="module")
def server(module_tmp):
    with private_tempdir(module_tmp / "server-tmp"), live_server(module_tmp, max_new_tokens=64) as s:
        with s.client(ACME) as c:
            assert hard_task(c, "qa").status_code == 201
            assert hard_task(c, "count", "{input}").status_code == 201
            assert hard_task(c, "cls", "Review: {input}\nAnswer:", labels=["yes", "no"]).status_code == 201
            for task, kind, seed in (("soft", "prompt_tuning", 1), ("pre", "prefix_tuning", 2),
                                     ("doomed", "prompt_tuning", 3)):
                r = upload(c, task, pack(native_soft_prompt(kind, T=2, seed=seed, labels=LABELS)))
                assert r.status_code == 201, r.text
        yield s


@pytest.fixture
def acme(server):
    with server.client(ACME, timeout=120) as c:
        yield c


def assert_same_scores(got: dict, want: dict) -> None:
    """Batched and solo forwards differ by float rounding only (~1e-7)."""
    assert got["label"] == want["label"] and got["scores"].keys() == want["scores"].keys()
    assert all(abs(got["scores"][k] - want["scores"][k]) < 1e-4 for k in want["scores"]), (got, want)


def generate(c: httpx.Client, task: str, text: str, n: int = 4) -> httpx.Response:
    return c.post(f"/v1/tasks/{task}/generate", json={"input": text, "max_new_tokens": n})


# ---- corrupt tensor file

def test_corrupt_tensor_file_fails_only_that_task(server, acme):
    good = [("soft", "x"), ("pre", "x"), ("qa", "x")]
    reference = {t: generate(acme, t, x).json()["text"] for t, x in good}
    ref_cls = acme.post("/v1/tasks/soft/classify", json={"input": "x"}).json()
    record = server.runtime.store.get("doomed", None, admin=True)
    path = Path(record.path) / "prompt.safetensors"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    path.write_bytes(bytes(blob))

    def doomed_generate():
        return generate(acme, "doomed", "x")

    with ThreadPoolExecutor(8) as pool:  # the corrupt task's requests arrive together with healthy ones
        bad = [pool.submit(doomed_generate) for _ in range(2)]
        bad_cls = pool.submit(acme.post, "/v1/tasks/doomed/classify", json={"input": "x"})
        ok = {t: pool.submit(generate, acme, t, x) for t, x in good}
        ok_cls = pool.submit(acme.post, "/v1/tasks/soft/classify", json={"input": "x"})
        for f in (*bad, bad_cls):
            err = assert_error(f.result(), 500)
            assert err["type"] in ("engine_error", "corrupt_artifact")
            assert "doomed@1" in err["message"] and ("sha256" in err["message"] or "corrupt" in err["message"]), err
        for t, f in ok.items():
            assert f.result().status_code == 200 and f.result().json()["text"] == reference[t]
        assert_same_scores(ok_cls.result().json(), ref_cls)
    with acme.stream("POST", "/v1/tasks/doomed/generate", json={"input": "x", "stream": True}) as r:
        events = list(sse_events(r.iter_lines()))
    assert [e for e, _ in events] == ["error"]
    assert acme.get("/v1/tasks/doomed").status_code == 200  # its record is intact; only serving it fails
    assert "doomed@1" in server.runtime.store.corrupt
    assert server.runtime.engine.ready
    server.wait_idle()


# ---- disk full

def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


class _FullFile(io.RawIOBase):
    """A file that opens but cannot take a byte: what a full disk looks like to a writer."""

    def __init__(self, real):
        self.real = real

    def writable(self):
        return True

    def write(self, _b):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.real.close()
        super().close()


def _full_open(path, mode="r", *a, **k):
    f = open(path, mode, *a, **k)
    return _FullFile(f) if any(m in mode for m in "wxa") else f


def _assert_v1_still_serves(acme, task: str = "soft"):
    r = acme.get(f"/v1/tasks/{task}")
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert [v["version"] for v in acme.get(f"/v1/tasks/{task}/versions").json()["data"]] == [1]
    assert generate(acme, task, "x", 2).status_code == 200


@pytest.mark.parametrize("where", ["store_write", "archive_extract"])
def test_disk_full_during_upload_leaves_nothing_and_the_previous_version_serves(server, acme, monkeypatch, module_tmp,
                                                                                 where):
    task = f"full-{where}"
    assert upload(acme, task, pack(native_soft_prompt("prompt_tuning", T=2, seed=10))).status_code == 201
    server.wait_idle()
    disk = DiskWatch(server.runtime.settings.store, module_tmp / "server-tmp")
    archive = pack(native_soft_prompt("prompt_tuning", T=2, seed=11, labels=LABELS))
    if where == "store_write":
        monkeypatch.setattr(format_mod, "write_durably", _enospc)
    else:
        monkeypatch.setattr(archive_mod, "open", _full_open, raising=False)
    with server.client(ACME) as fresh:  # its own connection: see test_a_500_does_not_drop_the_kept_alive_connection
        r = upload(fresh, task, archive)
    assert r.status_code >= 400
    assert_error(r, r.status_code)
    if where == "store_write":  # a hard prompt writes its manifest the same way
        with server.client(ACME) as fresh:
            r = hard_task(fresh, "qa2")
        assert_error(r, r.status_code)
    assert acme.get("/v1/tasks/qa2").status_code == 404
    disk.assert_unchanged()
    _assert_v1_still_serves(acme, task)
    monkeypatch.undo()  # space again: the same upload goes through, as version 2
    r = upload(acme, task, archive)
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    server.wait_idle()


def test_disk_full_in_the_store_is_a_507(acme, monkeypatch):
    monkeypatch.setattr(format_mod, "write_durably", _enospc)
    r = hard_task(acme, "qa3")
    err = assert_error(r, 507)
    assert "space" in err["message"].lower()


def test_disk_full_while_extracting_is_a_507_not_a_corrupt_archive(acme, monkeypatch):
    monkeypatch.setattr(archive_mod, "open", _full_open, raising=False)
    r = upload(acme, "fresh", pack(native_soft_prompt("prompt_tuning", T=2, seed=12)))
    err = assert_error(r, 507)
    assert "space" in err["message"].lower()


def test_a_500_does_not_drop_the_kept_alive_connection(server, monkeypatch):
    import socket

    def broken(*_a, **_k):
        raise RuntimeError("injected: an unexpected error in a route")

    monkeypatch.setattr(server.runtime.store, "list", broken)
    request = b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ACME.encode() + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, rest = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 500"), head
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        while len(rest) < length:
            rest += sock.recv(65536)
        assert b"connection: close" not in head.lower()  # no close announced, so the client will reuse it
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""
        except (socket.timeout, TimeoutError):
            closed = False
        except ConnectionResetError:
            closed = True
        assert not closed, "the server closed a kept-alive connection after a 500 it did not announce"


# ---- an exception in the engine for one request

def test_engine_exception_fails_one_request_and_its_batch_completes(server, acme, monkeypatch):
    runner = server.runtime.engine.engine.runner
    real_run = runner.run
    batches: list[list[str]] = []

    def run_step(batch, *rest):
        texts = [item.seq.request.text for item in batch]
        batches.append(texts)
        if FAILING in texts:
            raise RuntimeError("injected fault")
        return real_run(batch, *rest)

    reference = {x: generate(acme, "qa", x, 6).json()["text"] for x in INPUTS}
    ref_cls = acme.post("/v1/tasks/cls/classify", json={"input": "alpha"}).json()
    monkeypatch.setattr(runner, "run", run_step)
    for attempt in range(4):  # the co-batching depends on timing: a blocker makes the rest queue up together
        batches.clear()
        first = threading.Event()
        with ThreadPoolExecutor(8) as pool:
            def blocker():
                with acme.stream("POST", "/v1/tasks/count/generate",
                                 json={"input": COUNTING, "max_new_tokens": 24, "stream": True}) as r:
                    for event, _ in sse_events(r.iter_lines()):
                        first.set()
                    return r.status_code
            b = pool.submit(blocker)
            assert first.wait(60)
            futs = {x: pool.submit(generate, acme, "qa", x, 6) for x in (*INPUTS, FAILING)}
            cls = pool.submit(acme.post, "/v1/tasks/cls/classify", json={"input": "alpha"})
            results = {x: f.result() for x, f in futs.items()}
            assert b.result() == 200
            assert cls.result().status_code == 200
            assert_same_scores(cls.result().json(), ref_cls)
        err = assert_error(results.pop(FAILING), 500, "engine_error")
        assert "RuntimeError" in err["message"]
        for x, r in results.items():
            assert r.status_code == 200 and r.json()["text"] == reference[x], (x, r.text)
        if any(FAILING in b and len(b) > 1 for b in batches):
            break
    else:
        pytest.fail(f"the failing request never shared a step with others: {batches}")
    assert server.runtime.engine.ready
    server.wait_idle()


# ---- disconnect mid-stream

def _running(server) -> int:
    return server.runtime.engine.stats().running


def test_disconnect_mid_stream_frees_the_slot(server, acme):
    limiter = server.runtime.limiter
    cancelled = server.runtime.metrics.finished.labels("cancelled")._value.get()
    for path, body in (("/v1/tasks/count/generate", {"input": COUNTING, "max_new_tokens": 64, "stream": True}),
                       ("/v1/chat/completions", {"model": "count", "max_tokens": 64, "stream": True,
                                                 "messages": [{"role": "user", "content": COUNTING}]}),
                       ("/v1/completions", {"model": "count", "prompt": [COUNTING, COUNTING], "max_tokens": 64,
                                            "stream": True})):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ACME}"}, timeout=60) as c:
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for line in lines:  # the first data line: the request is running
                    if line.startswith("data:"):
                        break
                assert server.runtime.engine.in_flight >= 1 and limiter.in_flight("acme") >= 1
            # leaving the block closes the connection mid-stream
        server.wait_idle(timeout_s=30)
        assert _running(server) == 0 and limiter.in_flight("acme") == 0
    assert server.runtime.metrics.finished.labels("cancelled")._value.get() >= cancelled + 3
    assert generate(acme, "qa", "x", 2).status_code == 200
