"""Through HTTP, on models other than Llama: a server started on a sliding-window, softcapped model (Gemma2, eager
attention) and on a multi-query model (Falcon), with a PEFT adapter uploaded through the API, answers concurrent
requests of different lengths with exactly the greedy text and label probabilities the in-process engine gives each
request alone (which tests/server/engine/test_architectures.py proves equal to the model's own forward)."""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from prompt_core.fingerprint import fingerprint
from prompt_core.model import load_model
from prompt_core.spec import PromptKind, PromptSpec, make_labels
from prompt_store.peft_io import import_peft
from server.config import Settings
from server.engine.request import EngineRequest, PromptRef
from tests.helpers import greedy, new_engine, run
from tests.server.engine.test_architectures import saved

from .conftest import LiveServer

TEXTS = ["Hi", "What is the capital of France?", "The film was long but the ending made up for every slow minute."]
LABELS = {"positive": " positive", "negative": " negative", "mixed": " mixed feelings"}
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["gemma2-window-softcap", "falcon-multi-query"])
def served(request, tmp_path_factory):
    """(server, in-process loaded model of the same weights, PEFT adapter files)."""
    root = tmp_path_factory.mktemp(request.param)
    loaded = load_model(saved(request.param, root / "model"), device="cpu", dtype="float32")
    torch.manual_seed(3)
    peft_model = get_peft_model(loaded.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    peft_model.save_pretrained(root / "adapter")
    loaded.model.__dict__.pop("peft_config", None)
    server = LiveServer(Settings(store=root / "store", model=str(root / "model"), device="cpu", dtype="float32",
                                 self_check_tokens=32)).start()
    try:
        yield server, loaded, root / "adapter"
    finally:
        server.stop()


def zipped(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in directory.iterdir():
            zf.write(p, f"adapter/{p.name}")
    return buf.getvalue()


def alone(loaded, spec, tensors, text: str, mode: str):
    engine = new_engine(loaded)
    req = EngineRequest("r", PromptRef("t@1", spec, lambda: tensors), text, mode=mode, sampling=greedy(NEW_TOKENS))
    return run(engine, [req])["r"]


def test_greedy_text_and_labels_over_http_equal_the_engine_alone(served):
    server, loaded, adapter = served
    with server.client() as c:
        r = c.post("/v1/tasks", data={"task_id": "soft", "metadata": json.dumps({"labels": LABELS})},
                   files={"adapter": ("adapter.zip", zipped(adapter), "application/zip")})
        assert r.status_code == 201, r.text
        assert c.post("/v1/tasks", json={"task_id": "hard", "kind": "hard", "template": "Q: {input}\nA:",
                                         "labels": LABELS}).status_code == 201
        calls = [(task, mode, text) for task in ("soft", "hard") for mode in ("generate", "classify") for text in TEXTS]

        def call(args):
            task, mode, text = args
            body = {"input": text} | ({"max_new_tokens": NEW_TOKENS, "temperature": 0} if mode == "generate" else {})
            resp = c.post(f"/v1/tasks/{task}/{mode}", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()

        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(call, calls))
    spec, tensors, _ = import_peft(adapter, fingerprint(loaded.model))
    specs = {"soft": (PromptSpec(spec.kind, spec.num_virtual_tokens, spec.template, make_labels(LABELS)), tensors),
             "hard": (PromptSpec(PromptKind.HARD, 0, "Q: {input}\nA:", make_labels(LABELS)), None)}
    for (task, mode, text), got in zip(calls, answers):
        want = alone(loaded, *specs[task], text, mode)
        if mode == "generate":
            assert got["text"] == want.text, (task, text)
            assert got["usage"]["prompt_tokens"] == want.prompt_tokens
        else:
            probs = got["scores"]
            for name, p in zip(want.labels, want.label_probs):
                assert abs(probs[name] - p) < 1e-4, (task, text, name)
