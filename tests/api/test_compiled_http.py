"""A server started with `--compile` compiles its decode step before it is ready (never on a request), says so on
/ready and /metrics, and answers concurrent requests as the eager engine answers each alone."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from prompt_core.model import load_model
from prompt_core.spec import PromptKind, PromptSpec
from server.config import Settings
from server.engine.request import EngineRequest, PromptRef
from tests.engine.test_architectures import saved
from tests.helpers import greedy, new_engine, run

from .conftest import LiveServer

TEXTS = ["Hi", "What is the capital of France?", "The film was long but the ending made up for every slow minute."]
TEMPLATE = "Q: {input}\nA:"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    model = saved("llama", root / "model")
    server = LiveServer(Settings(store=root / "store", model=model, device="cpu", compile=True,
                                 self_check_tokens=32)).start()
    try:
        yield server, load_model(model, device="cpu", serving=True)   # the server's dtype
    finally:
        server.stop()


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_compiled_server_is_ready_compiled_and_answers_as_the_eager_engine_alone(served):
    server, loaded = served
    with server.client() as c:
        ready = c.get("/ready").json()
        assert ready["status"] == "ready" and ready["compiled"] is True
        assert metric(c.get("/metrics").text, "promptserve_decode_compile_seconds") > 0
        assert c.post("/v1/tasks", json={"task_id": "qa", "kind": "hard", "template": TEMPLATE}).status_code == 201

        def call(text):
            resp = c.post("/v1/tasks/qa/generate", json={"input": text, "max_new_tokens": 12, "temperature": 0})
            assert resp.status_code == 200, resp.text
            return resp.json()["text"]

        with ThreadPoolExecutor(len(TEXTS)) as pool:
            together = list(pool.map(call, TEXTS))
        alone = [call(t) for t in TEXTS]
        after = c.get("/metrics").text
    assert metric(after, "promptserve_decode_eager_steps") == 0      # the warm-up graphs served every step
    spec = PromptSpec(PromptKind.HARD, 0, TEMPLATE)
    for text, got_together, got_alone in zip(TEXTS, together, alone):
        req = EngineRequest("r", PromptRef("qa@1", spec), text, sampling=greedy(12))
        want = run(new_engine(loaded), [req])["r"].text
        assert got_together == want and got_alone == want, text
