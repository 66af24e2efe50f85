"""Files (/v1/files, server/api/routes/files.py) through the official `openai` client and plain HTTP, on a live
server holding a tiny random Llama: every accepted fine-tune format, line-numbered refusals that store nothing,
the size limit and the per-tenant quota. Batch input files are tested with batches (test_batches.py)."""

from __future__ import annotations

import openai
import pytest

from server.config import Settings
from tests.training.jobs.helpers import CLASSIFY, GENERATE, jsonl, save_tiny_llama

from .conftest import ACME, GLOBEX, LiveServer, assert_error, write_auth_file


@pytest.fixture(scope="module")
def server(module_tmp):
    settings = Settings(store=module_tmp / "store", model=str(save_tiny_llama(module_tmp / "tiny-llama")),
                        device="cpu", dtype="float32", threads=1, auth_file=write_auth_file(module_tmp / "auth.json"),
                        max_file_bytes=20_000, max_file_bytes_per_tenant=60_000, training_runner=False,
                        batch_runner=False)
    s = LiveServer(settings).start()
    try:
        yield s
    finally:
        s.stop()


def oai(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("rows, tasks", [
    (CLASSIFY[:4], ["classify"]),
    ([{"input": "a", "output": "b"}, {"input": "c", "output": "d"}], ["generate"]),
    (GENERATE[:3], ["classify", "generate"]),
    ([{"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}]}], ["classify", "generate"]),
])
def test_upload_accepts_every_format(server, rows, tasks):
    client = oai(server, ACME)
    f = client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file" and f.purpose == "fine-tune"
    assert f.bytes == len(jsonl(rows)) and f.filename == "train.jsonl"
    extra = f.model_extra
    assert extra["lines"] == len(rows) and extra["tasks"] == tasks
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == jsonl(rows)
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


@pytest.mark.parametrize("rows, message", [
    ([CLASSIFY[0], "", '{"input": "x", "label": "good"'], "train.jsonl:3: not valid JSON"),
    ([CLASSIFY[0], {"input": "x"}], "train.jsonl:2: missing field 'output'"),
    ([{"prompt": "x"}], "train.jsonl:1: missing field 'completion'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "train.jsonl:1: 'messages' has no assistant message"),
    ([{"text": "x"}], "train.jsonl:1: no known fields"),
    ([CLASSIFY[0], {"input": "x", "output": "y"}], "train.jsonl:2: a generate line, but line 1 is classify"),
    (["   "], "train.jsonl: no examples"),
])
def test_malformed_file_is_a_line_numbered_422(server, rows, message):
    with server.client(ACME) as c:
        before = c.get("/v1/files").json()["data"]
        r = c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", jsonl(rows))})
        err = assert_error(r, 422, "invalid_request")
        assert err["message"].startswith(message), err
        assert c.get("/v1/files").json()["data"] == before  # nothing stored


def test_upload_limits_and_quota(server):
    with server.client(GLOBEX) as c:
        r = c.post("/v1/files", data={"purpose": "assistants"}, files={"file": ("t.jsonl", jsonl(CLASSIFY))})
        assert "purpose" in assert_error(r, 422, "invalid_request")["message"]
        big = jsonl([{"input": "x" * 1000, "label": "a"}] * 25)   # > max_file_bytes (20,000)
        assert_error(c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("b.jsonl", big)}), 413)
        ok = jsonl([{"input": "x" * 1000, "label": "a"}] * 18)    # ~18 kB each; the tenant may store 60 kB
        ids = [c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("f.jsonl", ok)}).json()["id"]
               for _ in range(3)]
        err = assert_error(c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("f.jsonl", ok)}),
                           429, "quota_exceeded")
        assert "delete some files" in err["message"]
        with server.client(ACME) as other:  # the quota is per tenant
            r = other.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("f.jsonl", ok)})
            assert r.status_code == 200
            other.delete(f"/v1/files/{r.json()['id']}")
        for i in ids:
            assert c.delete(f"/v1/files/{i}").status_code == 200
        assert c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("f.jsonl", ok)}).status_code == 200
