"""A server started with `--quantize int8` serves the quantized model batched exactly as the in-process engine
serves each request alone on the same quantized weights, and leaves fine-tuning jobs queued for a training worker
(quantized layers have no gradient) instead of failing them."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from prompt_core.model import load_model
from prompt_core.spec import PromptKind, PromptSpec, make_labels
from server.config import Settings
from server.engine.request import EngineRequest, PromptRef
from tests.helpers import greedy, new_engine, run
from tests.server.engine.test_architectures import saved

from .conftest import LiveServer

TEXTS = ["Hi", "What is the capital of France?", "The film was long but the ending made up for every slow minute."]
LABELS = {"positive": " positive", "negative": " negative"}
TEMPLATE = "Q: {input}\nA:"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    model = saved("llama", root / "model")
    loaded = load_model(model, device="cpu", quantize="int8")
    server = LiveServer(Settings(store=root / "store", model=model, device="cpu", quantize="int8",
                                 self_check_tokens=32)).start()
    try:
        yield server, loaded
    finally:
        server.stop()


def test_quantized_server_answers_as_the_quantized_engine_alone(served):
    server, loaded = served
    assert server.runtime.loaded.quantization == "int8"
    with server.client() as c:
        ready = c.get("/ready").json()
        assert (ready["device"], ready["dtype"], ready["quantization"]) == ("cpu", "float32", "int8")
        assert re.search(r'promptserve_model_info\{[^}]*dtype="float32"[^}]*quantization="int8"[^}]*\} 1\.0',
                         c.get("/metrics").text)
        assert c.post("/v1/tasks", json={"task_id": "qa", "kind": "hard", "template": TEMPLATE,
                                         "labels": LABELS}).status_code == 201
        calls = [(mode, text) for mode in ("generate", "classify") for text in TEXTS]

        def call(args):
            mode, text = args
            body = {"input": text} | ({"max_new_tokens": 6, "temperature": 0} if mode == "generate" else {})
            resp = c.post(f"/v1/tasks/qa/{mode}", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()

        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(call, calls))
    spec = PromptSpec(PromptKind.HARD, 0, TEMPLATE, make_labels(LABELS))
    for (mode, text), got in zip(calls, answers):
        req = EngineRequest("r", PromptRef("qa@1", spec), text, mode=mode, sampling=greedy(6))
        want = run(new_engine(loaded), [req])["r"]
        if mode == "generate":
            assert got["text"] == want.text, text
        else:
            for name, p in zip(want.labels, want.label_probs):
                assert abs(got["scores"][name] - p) < 1e-4, (text, name)


def test_quantized_server_leaves_fine_tuning_to_a_worker(served):
    server, _ = served
    assert server.runtime.job_runner is None
    rows = [{"input": t, "label": lab} for t, lab in (("great", "positive"), ("awful", "negative"))]
    with server.client() as c:
        f = c.post("/v1/files", data={"purpose": "fine-tune"},
                   files={"file": ("t.jsonl", "\n".join(json.dumps(r) for r in rows).encode(), "application/jsonl")})
        assert f.status_code == 200, f.text
        job = c.post("/v1/fine_tuning/jobs", json={"model": "default", "training_file": f.json()["id"]})
        assert job.status_code == 200, job.text
        time.sleep(0.5)
        again = c.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()
    assert again["status"] == "queued", again
