"""Batches (OpenAI's Batch API) through the official `openai` client, on a live server holding a tiny random Llama.

What matters: every answer in the output equals the live route's for the same request; a bad file fails the batch
with line-numbered errors and runs nothing; a request the route refuses at run time lands in the error file with the
route's own status and body and the batch still completes; expiry keeps the outputs so far and lists every unrun
request as batch_expired; cancel keeps the partial output; batches and their files are private; quotas are 429s;
batch lines are marked batch work for the engine and charged to the tenant.
"""

from __future__ import annotations

import contextlib
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings

from .batching import (
    Hold,
    by_custom_id,
    completions,
    jsonl,
    line,
    live,
    read_file,
    save_tiny_model,
    stable,
    submit,
    tiny_soft_prompt,
    wait_batch,
)
from .conftest import ACME, GLOBEX, METERED, LiveServer, assert_error, hard_task, upload, write_auth_file


@pytest.fixture(scope="module")
def tiny_dir(module_tmp):
    return save_tiny_model(module_tmp / "tiny-llama")


def batch_settings(tmp, tiny_dir, **overrides) -> Settings:
    tmp.mkdir(parents=True, exist_ok=True)
    auth = write_auth_file(tmp / "auth.json", {"metered": {"tokens_per_minute": 30}})
    return Settings(store=tmp / "store", model=str(tiny_dir), device="cpu", dtype="float32", threads=1,
                    auth_file=auth, batch_max_in_flight=8, **overrides)


@pytest.fixture(scope="module")
def server(module_tmp, tiny_dir):
    s = LiveServer(batch_settings(module_tmp / "srv", tiny_dir, max_batches_per_tenant=8)).start()
    try:
        with s.client(ACME) as c:
            assert hard_task(c, "qa").status_code == 201
            assert upload(c, "soft", tiny_soft_prompt()).status_code == 201
            assert upload(c, "mood", tiny_soft_prompt(seed=2, labels=[{"name": "up", "verbalizer": " up"},
                                                                       {"name": "down", "verbalizer": " down"}])
                          ).status_code == 201
        with s.client(GLOBEX) as c:
            assert hard_task(c, "secret").status_code == 201
        yield s
    finally:
        s.stop()


def oai(server, key: str = ACME) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@contextlib.contextmanager
def gate(server, g):
    runner = server.runtime.batch_runner
    old, runner.gate = runner.gate, g
    try:
        yield g
    finally:
        runner.gate = old


def test_openai_client_end_to_end_equals_the_live_route(server):
    """200 lines over a hard prompt and a prompt-tuning task; each answer is the live route's (greedy)."""
    client = oai(server)
    rows = completions(200, models=("qa", "soft"))
    b = submit(client, rows, metadata={"purpose": "e2e"})
    assert b.status == "validating" and b.endpoint == "/v1/completions" and b.metadata == {"purpose": "e2e"}
    assert b.expires_at - b.created_at == 24 * 3600
    done = wait_batch(client, b.id)
    assert done.status == "completed", done.errors
    assert done.request_counts.total == 200 and done.request_counts.completed == 200
    assert done.request_counts.failed == 0 and done.error_file_id is None
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at
    out = by_custom_id(read_file(client, done.output_file_id))
    assert set(out) == {r["custom_id"] for r in rows}
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    for row in rows:
        got = out[row["custom_id"]]
        assert got["error"] is None and got["response"]["status_code"] == 200
        body = got["response"]["body"]
        assert got["response"]["request_id"] == body["id"] and body["id"].startswith("cmpl-")
        want = client.completions.with_raw_response.create(**row["body"]).http_response.json()
        assert stable(body) == stable(want), row["custom_id"]
    assert any(o["response"]["body"]["model"] == "soft" for o in out.values())


def test_native_routes_and_chat_in_a_batch_equal_the_live_routes(server):
    client = oai(server)
    cases = {"/v1/tasks/classify": [line(f"c{i}", "/v1/tasks/mood/classify", {"input": f"day {i}"})
                                    for i in range(6)],
             "/v1/tasks/generate": [line(f"g{i}", "/v1/tasks/soft/generate", {"input": f"x{i}", "max_new_tokens": 3})
                                    for i in range(6)],
             "/v1/chat/completions": [line(f"h{i}", "/v1/chat/completions", {
                 "model": "default", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": f"hi {i}"}],
                 "max_tokens": 3, "temperature": 0}) for i in range(6)]}
    ids = {endpoint: submit(client, rows, endpoint=endpoint).id for endpoint, rows in cases.items()}
    with server.client(ACME) as http:
        for endpoint, rows in cases.items():
            done = wait_batch(client, ids[endpoint])
            assert done.status == "completed" and done.request_counts.completed == len(rows), done
            out = by_custom_id(read_file(client, done.output_file_id))
            for row in rows:
                want = live(http, row)
                assert want.status_code == 200
                assert stable(out[row["custom_id"]]["response"]["body"]) == stable(want.json())


def test_a_bad_file_fails_the_batch_with_line_numbered_errors(server):
    client = oai(server)
    good = completions(1)[0]
    rows = [good, "{not json", {**good}, {**good, "custom_id": "u", "url": "/v1/embeddings"},
            {**good, "custom_id": "m", "method": "GET"},
            line("b", "/v1/completions", {"model": "qa", "prompt": "x", "max_tokens": -1}),
            line("n", "/v1/completions", {"model": "nope", "prompt": "x"}),
            line("e", "/v1/chat/completions", {"model": "qa", "messages": [{"role": "user", "content": "x"}]}),
            line("s", "/v1/completions", {"model": "qa", "prompt": "x", "stream": True}),
            line("o", "/v1/completions", {"model": "secret", "prompt": "x"}),   # globex's private task
            "", line("ok", "/v1/completions", {"model": "soft", "prompt": "y"})]
    b = submit(client, rows)
    done = wait_batch(client, b.id)
    assert done.status == "failed" and done.failed_at is not None and done.in_progress_at is None
    errors = [(e.line, e.code, e.param) for e in done.errors.data]
    assert errors == [(2, "invalid_json_line", None), (3, "duplicate_custom_id", "custom_id"),
                      (4, "invalid_url", "url"), (5, "invalid_method", "method"),
                      (6, "invalid_request", "body.max_tokens"), (7, "model_not_found", "body.model"),
                      (8, "mismatched_endpoint", "url"), (9, "invalid_request", "body.stream"),
                      (10, "model_not_found", "body.model")], errors
    messages = {e.line: e.message for e in done.errors.data}
    assert messages[3].endswith("custom_id 'r0' is already on line 1; each request needs its own")
    assert messages[2].startswith(f"{b.input_file_id}:2: not valid JSON")
    with server.client(ACME) as http:  # the body check is the live route's own validation, word for word
        refused = live(http, rows[5])
        assert refused.status_code == 422
        assert messages[6] == f"{b.input_file_id}:6: {refused.json()['error']['message']}"
    assert done.output_file_id is None and done.error_file_id is None and done.request_counts.total == 11
    assert done.request_counts.completed == 0


def test_run_time_failures_land_in_the_error_file_as_the_route_answered(server):
    """A chat with a system message to a soft-prompt task, and a prompt over the token limit: both pass the body
    check, both are refused by the route when they run, and the batch still completes."""
    client = oai(server)
    rows = [line("fine", "/v1/chat/completions", {"model": "soft", "messages": [{"role": "user", "content": "a"}],
                                                  "max_tokens": 2, "temperature": 0}),
            line("system", "/v1/chat/completions", {"model": "soft", "max_tokens": 2, "messages": [
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}]}),
            line("long", "/v1/chat/completions", {"model": "default", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "word " * 3000}]})]
    done = wait_batch(client, submit(client, rows, endpoint="/v1/chat/completions").id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    errors = by_custom_id(read_file(client, done.error_file_id))
    assert set(errors) == {"system", "long"} and set(by_custom_id(read_file(client, done.output_file_id))) == {"fine"}
    with server.client(ACME) as http:
        for row in rows[1:]:
            want = live(http, row)
            got = errors[row["custom_id"]]
            assert want.status_code in (413, 422)
            assert got["response"]["status_code"] == want.status_code and got["response"]["body"] == want.json()
            assert got["error"] == {"code": want.json()["error"]["type"], "message": want.json()["error"]["message"]}


def test_expiry_keeps_the_outputs_so_far_and_lists_the_unrun_as_batch_expired(server):
    client = oai(server)
    runner = server.runtime.batch_runner
    rows = completions(12, prefix="x")
    with gate(server, Hold(3)):
        b = submit(client, rows, window="60s")
        assert b.expires_at - b.created_at == 60
        wait_batch(client, b.id, until=("in_progress",), completed=3)
        runner.clock = lambda: time.time() + 61   # the window passes
        try:
            done = wait_batch(client, b.id)
        finally:
            runner.clock = time.time
    assert done.status == "expired" and done.expired_at is not None and done.completed_at is None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 9)
    out, errors = by_custom_id(read_file(client, done.output_file_id)), by_custom_id(read_file(client,
                                                                                             done.error_file_id))
    assert len(out) == 3 and not set(out) & set(errors) and set(out) | set(errors) == {r["custom_id"] for r in rows}
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors.values())


def test_cancel_goes_through_cancelling_and_keeps_the_partial_output(server):
    client = oai(server)
    with gate(server, Hold(2)):
        b = submit(client, completions(10, prefix="k"))
        wait_batch(client, b.id, until=("in_progress",), completed=2)
        cancelling = client.batches.cancel(b.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        done = wait_batch(client, b.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts.completed == 2 and done.error_file_id is None
    assert len(read_file(client, done.output_file_id)) == 2
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(b.id)


def test_batches_and_their_files_are_private(server):
    acme, globex = oai(server), oai(server, GLOBEX)
    b = submit(acme, completions(2))
    done = wait_batch(acme, b.id)
    for call in (lambda: globex.batches.retrieve(b.id), lambda: globex.batches.cancel(b.id),
                 lambda: globex.files.content(done.output_file_id), lambda: globex.files.retrieve(b.input_file_id),
                 lambda: globex.batches.create(input_file_id=b.input_file_id, endpoint="/v1/completions",
                                               completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert b.id not in [x.id for x in globex.batches.list()]
    assert b.id in [x.id for x in acme.batches.list(limit=100)]


def test_list_pages_newest_first_with_after(server):
    client = oai(server)
    ids = [submit(client, completions(1, prefix=f"p{i}-")).id for i in range(3)]
    first = client.batches.list(limit=2)
    assert [x.id for x in first.data] == ids[::-1][:2] and first.has_more
    assert client.batches.list(limit=2, after=first.data[-1].id).data[0].id == ids[0]
    for i in ids:
        wait_batch(client, i)


def test_create_is_refused_with_a_clear_4xx(server):
    client = oai(server)
    with server.client(ACME) as http:
        f = client.files.create(file=("b.jsonl", jsonl(completions(1))), purpose="batch")
        train = client.files.create(file=("t.jsonl", jsonl([{"input": "a", "output": "b"}])), purpose="fine-tune")
        for body, status, words in [
                ({"input_file_id": f.id, "endpoint": "/v1/embeddings", "completion_window": "24h"}, 422, "endpoint"),
                ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "48h"}, 422, "24h"),
                ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "soon"}, 422, "60s"),
                ({"input_file_id": train.id, "endpoint": "/v1/completions", "completion_window": "1h"}, 422,
                 "purpose 'batch'"),
                ({"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "1h"}, 404, ""),
                ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "1h", "x": 1}, 422, "x")]:
            err = assert_error(http.post("/v1/batches", json=body), status)
            assert words in err["message"], err
        assert_error(http.get("/v1/batches/batch_nope"), 404)
        assert_error(http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", b"\n \n")}), 422)


def test_quotas_are_429(module_tmp, tiny_dir):
    s = LiveServer(batch_settings(module_tmp / "quota", tiny_dir, max_batches_per_tenant=1, max_batch_lines=5,
                                  max_file_bytes_per_tenant=3000)).start()
    try:
        client = oai(s)
        with s.client(ACME) as c:
            assert hard_task(c, "qa").status_code == 201
        with pytest.raises(openai.RateLimitError, match="at most 5"):
            submit(client, completions(6))
        runner = s.runtime.batch_runner
        runner.gate = Hold(0)
        held = submit(client, completions(2))
        with pytest.raises(openai.RateLimitError, match="1 batches queued or running"):
            submit(client, completions(2))
        client.batches.cancel(held.id)
        assert wait_batch(client, held.id).status == "cancelled"
        runner.gate = Hold(100)
        assert wait_batch(client, submit(client, completions(2)).id).status == "completed"
        # stored bytes: a file that fills globex's 3000 bytes leaves no room for an output
        data = jsonl(completions(1))
        data = data[:-1] + b" " * (3000 - len(data)) + b"\n"
        other = oai(s, GLOBEX)
        f = other.files.create(file=("full.jsonl", data), purpose="batch")
        assert f.bytes == 3000
        with pytest.raises(openai.RateLimitError, match="no room for the batch's output"):
            other.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
        with pytest.raises(openai.RateLimitError, match="would pass the limit"):
            other.files.create(file=("more.jsonl", jsonl(completions(1))), purpose="batch")
    finally:
        s.stop()


def test_lines_are_batch_work_charged_to_the_tenant(server):
    """Every engine request of a line is marked priority=batch with the batch's tenant (the scheduler's fair-share
    counter is keyed on it), live requests stay interactive, and the tokens come out of the tenant's token rate."""
    engine = server.runtime.engine
    seen: list = []
    submit_, engine.submit = engine.submit, lambda req: (seen.append(req), submit_(req))[1]
    try:
        with server.client(ACME) as http:
            assert http.post("/v1/completions", json={"model": "qa", "prompt": "a", "max_tokens": 2}).status_code \
                == 200
        assert [r.priority for r in seen] == ["interactive"]
        rows = [line(f"m{i}", "/v1/completions", {"model": "default", "prompt": f"go {i}", "max_tokens": 16,
                                                  "ignore_eos": True, "temperature": 0}) for i in range(2)]
        done = wait_batch(oai(server, METERED), submit(oai(server, METERED), rows).id)
    finally:
        engine.submit = submit_
    assert done.status == "completed"
    batch = seen[1:]
    assert len(batch) == 2 and {(r.priority, r.tenant) for r in batch} == {("batch", "metered")}
    with server.client(METERED) as http:  # the batch spent the tenant's 30 tokens a minute
        assert_error(http.post("/v1/completions", json={"model": "default", "prompt": "a", "max_tokens": 1}), 429)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(server.client().get("/metrics").text) for s in fam.samples}
    assert samples[("promptserve_batches", (("status", "completed"),))] >= 1
    assert samples[("promptserve_batch_requests_total", (("outcome", "completed"),))] >= 2
    assert samples[("promptserve_batch_tokens_total", ())] >= 2 * 16


def test_a_worker_runs_the_batches_of_a_server_that_does_not(module_tmp, tiny_dir):
    """Scale-out: the server (`--no-batch-runner`) queues; `python -m server.batch_worker` on the same store runs
    the batch, with the same answers as the server's live route."""
    from server.batch_worker import run_worker

    settings = batch_settings(module_tmp / "scale", tiny_dir, batch_runner=False)
    server = LiveServer(settings).start()
    stop, worker = threading.Event(), None
    try:
        assert server.runtime.batch_runner is None
        client = oai(server)
        with server.client(ACME) as http:
            assert hard_task(http, "qa").status_code == 201
        rows = completions(20)
        b = submit(client, rows)
        assert client.batches.retrieve(b.id).status == "validating"   # nobody here runs it
        worker = threading.Thread(target=run_worker, args=(settings,), kwargs={"stop": stop}, daemon=True)
        worker.start()
        done = wait_batch(client, b.id, timeout_s=180)
        assert done.status == "completed" and done.request_counts.completed == 20, done
        out = by_custom_id(read_file(client, done.output_file_id))
        with server.client(ACME) as http:
            for row in rows:
                assert stable(out[row["custom_id"]]["response"]["body"]) == stable(live(http, row).json())
    finally:
        stop.set()
        if worker is not None:
            worker.join(60)
        server.stop()
