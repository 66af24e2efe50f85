"""PEFT adapters made with `peft` on the default model, uploaded as .zip and .tar.gz, served, and exported back.

The oracle is PEFT's own forward: the server's greedy tokens must be the argmax of PEFT's logits step by step, and
its classification probabilities must equal the softmax of PEFT's verbalizer log-likelihoods (a continuous check
that would catch a prompt applied wrongly even where the greedy tokens happen to agree).
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load as st_load
from transformers import AutoModelForCausalLM, AutoTokenizer

from prompt_core.model import resolve_model_path

from .conftest import ACME, GLOBEX, assert_error, live_server, pack, sse_events, unpack, upload

METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning"]
TEXT = "The capital of France is"
STEPS = 3
LABELS = {"yes": " yes", "no": " no", "maybe": " maybe so"}
QUESTIONS = ["Is Paris in France?", "Is the moon made of cheese?"]


def make_peft_config(method: str, T: int):
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T)
    if method.startswith("p_tuning"):
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, encoder_hidden_size=32,
                                        encoder_reparameterization_type="LSTM" if method.endswith("lstm") else "MLP")
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T)


@torch.no_grad()
def peft_logits(model, ids: list[int]) -> torch.Tensor:
    """PEFT's forward on one unpadded request (its generate is wrong for these methods with transformers 5.2x).
    [T+S, V] for prompt/P-tuning, [S, V] for prefix tuning."""
    input_ids = torch.tensor([ids])
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0].float()


def label_probs(model, tokenizer, text: str) -> dict[str, float]:
    """PEFT's forward as the oracle: softmax over labels of the summed log-probs of each verbalizer's tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    scores = {}
    for name, verbalizer in LABELS.items():
        v = tokenizer(verbalizer, add_special_tokens=False)["input_ids"]
        seq = ids + v
        logp = torch.log_softmax(peft_logits(model, seq)[-len(seq):], dim=-1)  # [S, V]
        scores[name] = sum(float(logp[len(ids) + j - 1, tok]) for j, tok in enumerate(v))
    z = torch.softmax(torch.tensor(list(scores.values()), dtype=torch.float64), 0)
    return dict(zip(scores, z.tolist()))


@pytest.fixture(scope="module")
def adapters(module_tmp):
    """method -> (saved adapter files, PEFT's greedy continuation of TEXT, PEFT's label probabilities)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: extra OpenMP threads only spin on a shared 2-core machine
    try:
        return _make_adapters(module_tmp)
    finally:
        torch.set_num_threads(threads)


def _make_adapters(module_tmp: Path) -> dict:
    path = resolve_model_path("default")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    out = {}
    for i, method in enumerate(METHODS):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(base, make_peft_config(method, T=4)).eval()
        seq, greedy = list(ids), []
        for _ in range(STEPS):
            nxt = int(peft_logits(model, seq)[-1].argmax())
            greedy.append(nxt)
            seq.append(nxt)
        directory = module_tmp / method
        model.save_pretrained(directory)
        files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
        out[method] = (files, greedy, [label_probs(model, tokenizer, q) for q in QUESTIONS])
        base = model.get_base_model()
    with torch.no_grad():
        out["base"] = (None, None, [label_probs(base, tokenizer, q) for q in QUESTIONS])  # no prompt at all
    return out


@pytest.fixture(scope="module")
def server(module_tmp, adapters):
    with live_server(module_tmp) as s:
        yield s


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
@pytest.mark.parametrize("method", METHODS)
def test_upload_serves_what_peft_computes(server, adapters, method, fmt):
    files, greedy, _ = adapters[method]
    task = f"{method.replace('_', '-')}-{fmt.replace('.', '')}"
    with server.client(ACME) as c:
        r = upload(c, task, pack(files, fmt), filename=f"adapter.{fmt}")
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["kind"] == ("prefix_tuning" if method.startswith("prefix") else
                                "p_tuning" if method.startswith("p_tuning") else "prompt_tuning")
        assert body["num_virtual_tokens"] == 4 and len(body["sha256"]) == 64
        with c.stream("POST", f"/v1/tasks/{task}/generate",
                      json={"input": TEXT, "max_new_tokens": STEPS, "stream": True}) as resp:
            events = list(sse_events(resp.iter_lines()))
    ids = [json.loads(d)["id"] for e, d in events if e == "token" and json.loads(d)["id"] is not None]
    assert ids == greedy[:len(ids)] and len(ids) >= 1
    done = json.loads(events[-1][1])
    assert done["usage"]["prompt_tokens"] == len(TEXT.split()) + 4  # every kind's 4 virtual tokens count


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
@pytest.mark.parametrize("method", METHODS)
def test_export_gives_back_the_same_peft_adapter(server, adapters, method, fmt):
    files, _, _ = adapters[method]
    task = f"{method.replace('_', '-')}-{fmt.replace('.', '')}"
    with server.client(ACME) as c:
        r = c.get(f"/v1/tasks/{task}/export", params={"format": fmt})
    assert r.status_code == 200, r.text
    assert f'{task}-v1.{fmt}' in r.headers["content-disposition"]
    got = unpack(r.content, fmt)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(got)
    original = st_load(files["adapter_model.safetensors"])["prompt_embeddings"]
    exported = st_load(got["adapter_model.safetensors"])["prompt_embeddings"]
    assert exported.shape == original.shape and torch.equal(exported, original)
    cfg, orig_cfg = json.loads(got["adapter_config.json"]), json.loads(files["adapter_config.json"])
    for key in ("peft_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
        assert cfg[key] == orig_cfg[key], key


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_export_loads_with_auto_peft_model_alone(server, adapters, method, tmp_path):
    """`AutoPeftModelForCausalLM.from_pretrained(dir)` finds the base model from the export alone (no hub) and
    computes what the uploaded adapter computes."""
    task = f"{method.replace('_', '-')}-zip"
    with server.client(ACME) as c:
        r = c.get(f"/v1/tasks/{task}/export")
    assert r.status_code == 200, r.text
    for name, data in unpack(r.content, "zip").items():
        (tmp_path / name).write_bytes(data)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(resolve_model_path("default")).resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg["base_model_name_or_path"])
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    seq = list(ids)
    for _ in range(STEPS):  # PEFT's own forward, step by step (its generate() is off for these methods)
        seq.append(int(peft_logits(model, seq)[-1].argmax()))
    assert seq[len(ids):] == adapters[method][1]


def test_export_of_a_peft_upload_round_trips_through_the_server(server, adapters):
    """Upload the exported archive as a new task: it serves the same tokens."""
    _, greedy, _ = adapters["prefix_tuning"]
    with server.client(ACME) as c:
        archive = c.get("/v1/tasks/prefix-tuning-zip/export").content
        assert upload(c, "re-imported", archive).status_code == 201
        out = c.post("/v1/tasks/re-imported/generate", json={"input": TEXT, "max_new_tokens": STEPS}).json()
        first = c.post("/v1/tasks/prefix-tuning-zip/generate", json={"input": TEXT, "max_new_tokens": STEPS}).json()
    assert out["text"] == first["text"]


@pytest.mark.parametrize("method", METHODS)
def test_classify_equals_peft_likelihoods(server, adapters, method):
    files, _, expected = adapters[method]
    task = f"{method.replace('_', '-')}-cls"
    meta = {"labels": LABELS, "visibility": "public", "description": "yes/no/maybe"}
    with server.client(ACME) as c:
        r = upload(c, task, pack(files), meta)
        assert r.status_code == 201, r.text
        assert r.json()["task_type"] == "classify" and r.json()["visibility"] == "public"
        res = c.post(f"/v1/tasks/{task}/classify", json={"input": QUESTIONS}).json()
    for got, want, base in zip(res, expected, adapters["base"][2]):
        assert set(got["scores"]) == set(LABELS)
        for name in LABELS:
            assert abs(got["scores"][name] - want[name]) < 1e-4, (name, got, want)
        assert max(abs(want[n] - base[n]) for n in LABELS) > 1e-3  # the prompt really changes the answer
    with server.client(GLOBEX) as other:  # public: usable by another tenant
        assert other.post(f"/v1/tasks/{task}/classify", json={"input": "Is the sky blue?"}).status_code == 200


def test_peft_upload_for_another_model_is_refused(server, adapters):
    files, _, _ = adapters["prompt_tuning"]
    cfg = json.loads(files["adapter_config.json"])
    cfg["token_dim"] = 1024
    bad = {**files, "adapter_config.json": json.dumps(cfg).encode()}
    with server.client(ACME) as c:
        err = assert_error(upload(c, "wrong-model", pack(bad)), 422)
        assert "576" in err["message"] or "1024" in err["message"]
        assert c.get("/v1/tasks/wrong-model").status_code == 404
