"""Native endpoints over httpx against a live server: tasks, generate (JSON and SSE), classify, and the error shape."""

from __future__ import annotations

import json

import pytest

from .conftest import ACME, ADMIN, assert_error, hard_task, live_server, native_soft_prompt, pack, sse_events, upload


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp, max_input_tokens=64, max_new_tokens=32, max_upload_bytes=256 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def acme(server):
    with server.client(ACME) as c:
        assert hard_task(c, "qa").status_code == 201
        r = hard_task(c, "sentiment", "Review: {input}\nSentiment:", labels=["positive", "negative"])
        assert r.status_code == 201, r.text
        yield c


def test_hard_task_record(acme):
    r = hard_task(acme, "record", "Say: {input}", description="d", generation={"max_new_tokens": 3})
    assert r.status_code == 201
    body = r.json()
    assert body["id"] == "record" and body["version"] == 1 and body["kind"] == "hard"
    assert body["num_virtual_tokens"] == 0 and body["sha256"] is None and body["owner"] == "acme"
    assert body["visibility"] == "private" and body["task_type"] == "generate"
    assert r.headers["location"] == "/v1/tasks/record@1"
    assert acme.get("/v1/tasks/record").json() == body
    # the task's generation defaults apply when the request leaves them out
    out = acme.post("/v1/tasks/record/generate", json={"input": "hello"}).json()
    assert out["usage"]["completion_tokens"] <= 3


def test_reupload_makes_a_new_version_and_refs_pin_one(acme):
    assert hard_task(acme, "versioned", "One: {input}").json()["version"] == 1
    assert hard_task(acme, "versioned", "Two: {input}").json()["version"] == 2
    assert acme.get("/v1/tasks/versioned").json()["template"] == "Two: {input}"
    assert acme.get("/v1/tasks/versioned@1").json()["template"] == "One: {input}"
    assert [v["version"] for v in acme.get("/v1/tasks/versioned/versions").json()["data"]] == [1, 2]
    old = acme.post("/v1/tasks/versioned@1/generate", json={"input": "x", "max_new_tokens": 2}).json()
    assert old["task"] == "versioned@1"


def test_generate_json(acme):
    r = acme.post("/v1/tasks/qa/generate", json={"input": "What is the capital of France?", "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "task", "text", "finish_reason", "usage"}
    assert body["task"] == "qa@1" and body["finish_reason"] in ("stop", "length")
    assert isinstance(body["text"], str) and 1 <= body["usage"]["completion_tokens"] <= 6
    assert body["usage"]["prompt_tokens"] > 5
    # greedy is deterministic
    again = acme.post("/v1/tasks/qa/generate", json={"input": "What is the capital of France?", "max_new_tokens": 6})
    assert again.json()["text"] == body["text"]


def test_seed_makes_sampling_reproducible(acme):
    req = {"input": "Tell me a story", "max_new_tokens": 8, "temperature": 1.0, "seed": 1234}
    a = acme.post("/v1/tasks/qa/generate", json=req).json()["text"]
    b = acme.post("/v1/tasks/qa/generate", json=req).json()["text"]
    assert a == b


def test_generate_sse_one_event_per_token_then_done(acme):
    req = {"input": "What is the capital of France?", "max_new_tokens": 6, "stream": True}
    with acme.stream("POST", "/v1/tasks/qa/generate", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    names = [e for e, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"}
    tokens = [json.loads(d) for e, d in events if e == "token"]
    done = json.loads(events[-1][1])
    with_ids = [t for t in tokens if t["id"] is not None]
    assert [t["index"] for t in with_ids] == list(range(len(with_ids)))
    assert len(with_ids) == done["usage"]["completion_tokens"]
    assert "".join(t["text"] for t in tokens) == done["text"]
    plain = acme.post("/v1/tasks/qa/generate", json={**req, "stream": False}).json()
    assert plain["text"] == done["text"] and plain["finish_reason"] == done["finish_reason"]


def test_stop_string_ends_generation(acme):
    full = acme.post("/v1/tasks/qa/generate", json={"input": "Count: 1, 2, 3,", "max_new_tokens": 8}).json()["text"]
    assert len(full) > 2
    stop = full.strip()[:2]
    r = acme.post("/v1/tasks/qa/generate", json={"input": "Count: 1, 2, 3,", "max_new_tokens": 8, "stop": [stop]})
    body = r.json()
    assert body["finish_reason"] == "stop" and stop not in body["text"]


def test_classify_one_and_many(acme):
    one = acme.post("/v1/tasks/sentiment/classify", json={"input": "I loved every minute of it"}).json()
    assert set(one) == {"label", "scores"} and set(one["scores"]) == {"positive", "negative"}
    assert abs(sum(one["scores"].values()) - 1) < 1e-5
    assert one["label"] == max(one["scores"], key=one["scores"].get)
    many = acme.post("/v1/tasks/sentiment/classify", json={"input": ["great film", "awful, boring film"]}).json()
    assert isinstance(many, list) and len(many) == 2
    assert all(set(x) == {"label", "scores"} for x in many)
    # the list answer equals separate calls (batched equals alone)
    alone = acme.post("/v1/tasks/sentiment/classify", json={"input": "awful, boring film"}).json()
    assert many[1]["label"] == alone["label"]
    assert abs(many[1]["scores"]["negative"] - alone["scores"]["negative"]) < 1e-4


def test_classify_without_labels_is_422(acme):
    assert_error(acme.post("/v1/tasks/qa/classify", json={"input": "x"}), 422, "invalid_request")


def test_soft_prompt_native_artifact_zip_and_tar(acme):
    files = native_soft_prompt("prompt_tuning", T=4, seed=1)
    for fmt, name in (("zip", "soft-zip"), ("tar.gz", "soft-tar")):
        r = upload(acme, name, pack(files, fmt), {"description": "native"}, filename=f"a.{fmt}")
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["kind"] == "prompt_tuning" and body["num_virtual_tokens"] == 4 and len(body["sha256"]) == 64
        out = acme.post(f"/v1/tasks/{name}/generate", json={"input": "hi", "max_new_tokens": 2})
        assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] >= 5  # 4 virtual + input
    exported = acme.get("/v1/tasks/soft-zip/export", params={"layout": "native"})
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"


# ---- the error shape


def test_401_without_or_with_a_wrong_key(server):
    with server.client() as anon, server.client("not-a-key-0123456789") as bad:
        for c in (anon, bad):
            err = assert_error(c.get("/v1/tasks"), 401, "unauthorized")
            assert "key" in err["message"]
            assert_error(c.post("/v1/tasks/qa/generate", json={"input": "x"}), 401)
        # probes and metrics need no key
        assert anon.get("/health").status_code == 200
        assert anon.get("/ready").json()["status"] == "ready"
        assert anon.get("/metrics").status_code == 200


def test_404s(acme):
    assert_error(acme.get("/v1/tasks/missing"), 404, "not_found")
    assert_error(acme.post("/v1/tasks/missing/generate", json={"input": "x"}), 404, "not_found")
    assert_error(acme.get("/v1/tasks/qa@7"), 404, "not_found")
    assert_error(acme.get("/no/such/endpoint"), 404, "not_found")
    assert_error(acme.delete("/v1/tasks/missing"), 404, "not_found")


def test_422_names_the_field_paths(acme):
    err = assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 0}), 422,
                       "invalid_request")
    assert "body.max_new_tokens" in err["message"]
    err = assert_error(acme.post("/v1/tasks/qa/generate", json={"max_new_tokens": 2}), 422)
    assert "body.input" in err["message"]
    err = assert_error(acme.post("/v1/tasks/qa/generate", content=b'{"input": "x", "temperature": NaN}',
                                 headers={"content-type": "application/json"}), 422)
    assert "body.temperature" in err["message"]
    err = assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "x", "stop": ["s"] * 1000}), 422)
    assert "body.stop" in err["message"]
    err = assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_tokens": 3}), 422)
    assert "body.max_tokens" in err["message"]  # a typo is refused, not ignored
    for raw in (b"{not json", b'{"input": "\xff\xfe"}', b"[]", b""):  # invalid JSON, invalid UTF-8, no object
        assert_error(acme.post("/v1/tasks/qa/generate", content=raw, headers={"content-type": "application/json"}),
                     422, "invalid_request")
    err = assert_error(acme.post("/v1/tasks/qa/classify", json={"input": []}), 422)
    assert err["message"].startswith("body.input: ")  # union branches are not named in the path
    err = assert_error(hard_task(acme, "bad-template", "no slot here"), 422)
    assert "{input}" in err["message"]
    err = assert_error(acme.post("/v1/tasks", json={"task_id": "x", "template": "{input}", "kind": "soft"}), 422)
    assert "body.kind" in err["message"]
    assert_error(hard_task(acme, "../escape"), 422)
    err = assert_error(hard_task(acme, "bad-defaults", generation={"max_new_tokens": "many"}), 422)
    assert "body.generation.max_new_tokens" in err["message"]


def test_413_for_long_inputs_and_too_many_tokens(acme):
    err = assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "word " * 500}), 413, "input_too_long")
    assert "64" in err["message"]
    assert_error(acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 33}), 413)


def test_uploads_refused_with_clear_errors(acme):
    big = b"\0" * (300 * 1024)
    assert_error(upload(acme, "too-big", big), 413, "payload_too_large")
    err = assert_error(upload(acme, "not-archive", b"hello, not an archive"), 422)
    assert "zip" in err["message"]
    err = assert_error(upload(acme, "bad-meta", pack(native_soft_prompt()), {"visibility": "everyone"}), 422)
    assert "body.metadata.visibility" in err["message"]
    err = assert_error(acme.post("/v1/tasks", files={"task_id": (None, "no-file")}), 422)  # multipart, no file
    assert "body.adapter" in err["message"]
    assert_error(acme.post("/v1/tasks", content=b"x", headers={"content-type": "text/plain"}), 415)
    extra = {"task_id": (None, "extra"), "metadata": (None, "{}"), "surprise": (None, "x"),
             "adapter": ("a.zip", pack(native_soft_prompt()))}
    err = assert_error(acme.post("/v1/tasks", files=extra), 422, "invalid_request")  # a malformed multipart body
    assert "fields" in err["message"]
    pickled = pack({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04"})
    err = assert_error(upload(acme, "pickle", pickled), 422)
    assert "pickle" in err["message"]
    assert acme.get("/v1/tasks/too-big").status_code == 404  # nothing half-created


def test_admin_deletes_and_task_disappears(server, acme):
    assert hard_task(acme, "doomed").status_code == 201
    with server.client(ADMIN) as admin:
        assert admin.delete("/v1/tasks/doomed").status_code == 204
    assert_error(acme.get("/v1/tasks/doomed"), 404)
    assert_error(acme.post("/v1/tasks/doomed/generate", json={"input": "x"}), 404)


def test_openapi_documents_every_endpoint(server):
    with server.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/export", "/v1/tasks/{task_id}/generate",
                 "/v1/tasks/{task_id}/classify", "/v1/models", "/v1/completions", "/v1/chat/completions",
                 "/health", "/ready", "/metrics"):
        assert path in paths
    assert set(paths["/v1/tasks"]["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}


def test_oversized_json_bodies_are_413_before_parsing(acme):
    body = b'{"input": "' + b"a" * (9 * 1024 * 1024) + b'"}'  # over the default 8 MiB --max-body-bytes
    err = assert_error(acme.post("/v1/tasks/qa/classify", content=body,
                                 headers={"content-type": "application/json"}), 413, "payload_too_large")
    assert "at most 8388608 bytes" in err["message"]

    def chunks():  # no content-length: counted as it arrives
        for i in range(0, len(body), 1 << 20):
            yield body[i:i + (1 << 20)]

    r = acme.post("/v1/tasks/qa/generate", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert acme.get("/health").status_code == 200
