"""Quotas (429 + Retry-After), the global queue bound (503), cancellation on disconnect, and metric families."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    ACME,
    ADMIN,
    GLOBEX,
    METERED,
    assert_error,
    hard_task,
    live_server,
    native_soft_prompt,
    pack,
    sse_events,
    upload,
)

LONG = 400  # tokens a held request would generate: it is cancelled long before
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the model keeps counting instead of stopping early


@pytest.fixture(scope="module")
def server(module_tmp):
    tenants = {"acme": {"max_concurrent": 1}, "metered": {"tokens_per_minute": 20}}
    with live_server(module_tmp, tenants=tenants, max_queue=3, max_concurrent=8, max_tasks_per_tenant=2) as s:
        with s.client(ADMIN) as admin:
            assert hard_task(admin, "qa", visibility="public").status_code == 201
            assert hard_task(admin, "count", "{input}", visibility="public").status_code == 201
            assert upload(admin, "soft", pack(native_soft_prompt("prefix_tuning", T=2)),
                          {"visibility": "public"}).status_code == 201
        yield s


def open_stream(stack: ExitStack, client: httpx.Client, task: str = "count", first_token: bool = True):
    """Start a long streaming generate; return once it is admitted (headers) or producing (first token).

    Keep the returned event iterator referenced: dropping it closes the connection, which cancels the request."""
    r = stack.enter_context(client.stream("POST", f"/v1/tasks/{task}/generate",
                                          json={"input": COUNTING, "max_new_tokens": LONG, "stream": True}))
    assert r.status_code == 200
    events = sse_events(r.iter_lines())
    if first_token:
        event, _ = next(events)
        assert event == "token"
    return events


def cancelled_total(server) -> float:
    return server.runtime.metrics.finished.labels("cancelled")._value.get()


def test_429_when_a_tenant_has_too_many_requests_in_flight(server):
    with server.client(ACME) as acme, server.client(GLOBEX) as globex, ExitStack() as stack:
        held = open_stream(stack, acme)
        err = acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 1})
        assert_error(err, 429, "rate_limited")
        assert int(err.headers["retry-after"]) >= 1
        assert_error(acme.post("/v1/completions", json={"model": "qa", "prompt": "x", "max_tokens": 1}), 429)
        # another tenant is not affected
        assert globex.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 1}).status_code == 200
        assert next(held)[0] == "token"  # the held request was never disturbed
        stack.close()
        server.wait_idle()
        assert server.runtime.limiter.in_flight("acme") == 0
        assert acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 1}).status_code == 200


def test_a_call_larger_than_the_tenants_concurrency_is_not_retryable(server):
    """acme may run 1 request at once: a list of 2 can never be admitted, so it is no 429 and has no Retry-After."""
    with server.client(ACME) as acme:
        for path, body in (("/v1/tasks/qa/classify", {"input": ["a", "b"]}),
                           ("/v1/completions", {"model": "qa", "prompt": ["a", "b"], "max_tokens": 1})):
            r = acme.post(path, json=body)
            err = assert_error(r, 413, "too_many_inputs")
            assert "retry-after" not in r.headers
            assert "can never be admitted" in err["message"] and "at most 1 inputs" in err["message"]
        assert server.runtime.limiter.in_flight("acme") == 0  # nothing was held
        r = acme.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 1})
        assert r.status_code == 200


def test_429_when_a_tenant_spends_its_token_rate(server):
    with server.client(METERED) as metered:
        first = metered.post("/v1/tasks/qa/generate", json={"input": "word " * 20, "max_new_tokens": 4})
        assert first.status_code == 200
        used = first.json()["usage"]["prompt_tokens"] + first.json()["usage"]["completion_tokens"]
        assert used > 20  # more than the whole minute's budget
        err = metered.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 1})
        assert_error(err, 429, "rate_limited")
        # the debt refills at 20 tokens/min: Retry-After says when the balance is positive again
        assert int(err.headers["retry-after"]) >= (used - 20) * 3 - 1


def test_503_when_the_global_queue_is_full(server):
    with server.client(GLOBEX) as globex, ExitStack() as stack:
        held = [open_stream(stack, globex, first_token=False) for _ in range(3)]  # max_queue: all tenants
        err = globex.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 1})
        assert_error(err, 503, "overloaded")
        assert err.headers["retry-after"] == "1"
        with server.client(ACME) as acme:  # the bound is global
            assert_error(acme.post("/v1/completions", json={"model": "qa", "prompt": "x", "max_tokens": 1}), 503)
        assert all(next(h)[0] == "token" for h in held)
        stack.close()
        server.wait_idle()
    with server.client(GLOBEX) as globex:
        assert globex.post("/v1/tasks/qa/generate", json={"input": "x", "max_new_tokens": 1}).status_code == 200


def test_429_when_a_tenant_owns_too_many_tasks(server):
    with server.client(GLOBEX) as globex:
        for i in range(2):
            assert hard_task(globex, f"mine-{i}").status_code == 201
        assert hard_task(globex, "mine-0", "New: {input}").status_code == 201  # a new version is not a new task
        assert_error(hard_task(globex, "mine-2"), 429, "quota_exceeded")
        assert globex.delete("/v1/tasks/mine-1").status_code == 204
        assert hard_task(globex, "mine-2").status_code == 201


def test_stream_disconnect_cancels_and_frees_the_slot(server):
    before = cancelled_total(server)
    with server.client(GLOBEX) as globex, ExitStack() as stack:
        held = open_stream(stack, globex, task="soft")
        assert server.runtime.engine.stats().running == 1 and next(held)[0] == "token"
        stack.close()  # the client goes away mid-stream
        server.wait_idle()
    assert server.runtime.engine.stats().running == 0
    assert server.runtime.limiter.in_flight("globex") == 0
    assert cancelled_total(server) == before + 1


def test_non_streaming_disconnect_cancels_too(server):
    before = cancelled_total(server)
    with server.client(GLOBEX, timeout=httpx.Timeout(60, read=1.5)) as globex:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            globex.post("/v1/tasks/count/generate", json={"input": COUNTING, "max_new_tokens": LONG})
    server.wait_idle()
    assert cancelled_total(server) == before + 1
    assert server.runtime.limiter.in_flight("globex") == 0


def test_openai_stream_disconnect_cancels(server):
    """The OpenAI client closing its stream (e.g. a user pressing stop) cancels the request."""
    before = cancelled_total(server)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=GLOBEX, max_retries=0) as oai:
        stream = oai.completions.create(model="count", prompt=COUNTING, max_tokens=LONG, stream=True)
        next(iter(stream))
        stream.close()
    server.wait_idle()
    assert cancelled_total(server) == before + 1


FAMILIES = {
    "promptserve_requests": "counter", "promptserve_request_duration_seconds": "histogram",
    "promptserve_queue_wait_seconds": "histogram", "promptserve_time_to_first_token_seconds": "histogram",
    "promptserve_time_per_output_token_seconds": "histogram", "promptserve_prompt_tokens": "counter",
    "promptserve_generated_tokens": "counter", "promptserve_batch_size": "histogram",
    "promptserve_running_requests": "gauge", "promptserve_waiting_requests": "gauge",
    "promptserve_prompt_cache_hits": "counter", "promptserve_prompt_cache_misses": "counter",
    "promptserve_prompt_cache_evictions": "counter", "promptserve_prompt_cache_resident_bytes": "gauge",
    "promptserve_tenant_requests": "counter", "promptserve_tenant_tokens": "counter",
    "promptserve_kv_cache_capacity_bytes": "gauge", "promptserve_kv_cache_used_bytes": "gauge",
    "promptserve_kv_cache_shared_bytes": "gauge", "promptserve_prefix_cache_queries": "counter",
    "promptserve_prefix_cache_hits": "counter",
}


def test_metric_families_are_exported_with_bounded_labels(server):
    with server.client(ACME) as acme:
        for _ in range(2):  # a miss, then a hit in the prompt cache
            assert acme.post("/v1/tasks/soft/generate", json={"input": "hi", "max_new_tokens": 3}).status_code == 200
    with server.client() as anon:
        text = anon.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in FAMILIES.items():
        assert name in fams and fams[name].type == kind, name
    samples = {s.name: s for f in fams.values() for s in f.samples}
    for name in ("promptserve_time_to_first_token_seconds_count", "promptserve_queue_wait_seconds_count",
                 "promptserve_time_per_output_token_seconds_count", "promptserve_batch_size_count"):
        assert samples[name].value > 0, name
    assert samples["promptserve_generated_tokens_total"].value > 0
    tiers = {s.labels["tier"] for s in fams["promptserve_prompt_cache_hits"].samples}
    assert {"host", "device"} <= tiers
    assert sum(s.value for s in fams["promptserve_prompt_cache_hits"].samples) >= 1
    assert sum(s.value for s in fams["promptserve_prompt_cache_resident_bytes"].samples) > 0
    endpoints = {s.labels["endpoint"] for s in fams["promptserve_requests"].samples}
    assert "/v1/tasks/{task_id}/generate" in endpoints and not any("soft" in e for e in endpoints)
    statuses = {(s.labels["endpoint"], s.labels["status"]) for s in fams["promptserve_requests"].samples}
    assert ("/v1/tasks/{task_id}/generate", "429") in statuses and ("/v1/tasks/{task_id}/generate", "503") in statuses
    labels = {k for f in fams.values() for s in f.samples for k in s.labels}
    assert not labels & {"task", "task_id", "model"}  # tasks are unbounded: never a label
    assert fams["promptserve_running_requests"].samples[0].value == 0
    capacity = samples["promptserve_kv_cache_capacity_bytes"].value
    assert capacity == server.runtime.engine.engine.cache.bytes() > 0
    assert samples["promptserve_kv_cache_used_bytes"].value == 0      # idle: every block is back in the pool
    assert samples["promptserve_prefix_cache_queries_total"].value > 0


def test_corrupt_prompt_fails_alone_in_band_with_the_error_shape(server):
    """A tensor file corrupted on disk fails its own requests (500 JSON, or an SSE `error` event); others serve."""
    with server.client(ADMIN) as admin:
        r = upload(admin, "corrupt", pack(native_soft_prompt("prompt_tuning", T=2, seed=9)))
        assert r.status_code == 201
        record = server.runtime.store.get("corrupt", None, admin=True)
        (Path(record.path) / "prompt.safetensors").write_bytes(b"garbage")
        assert_error(admin.post("/v1/tasks/corrupt/generate", json={"input": "x", "max_new_tokens": 2}), 500,
                     "engine_error")
        with admin.stream("POST", "/v1/tasks/corrupt/generate",
                          json={"input": "x", "max_new_tokens": 2, "stream": True}) as resp:
            events = list(sse_events(resp.iter_lines()))
        assert [e for e, _ in events] == ["error"]
        body = json.loads(events[0][1])
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
        assert admin.post("/v1/tasks/soft/generate", json={"input": "x", "max_new_tokens": 1}).status_code == 200
    server.wait_idle()
