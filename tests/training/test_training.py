"""Training on a tiny random GQA Llama: parity with serving and with PEFT, learning, resuming, bad data, the CLI."""

from __future__ import annotations

import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from io import BytesIO
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prompt_core.batch import build_prefill
from prompt_core.forward import hidden_states, label_scores, last_logits, logits, prefix_cache
from prompt_core.layout import plan_row
from prompt_core.spec import make_labels
from prompt_store.format import read_artifact
from training.cli import main as cli_main
from training.config import TrainConfig
from training.curves import read_log
from training.data import load_jsonl
from training.evaluate import greedy_decode
from training.loop import train
from training.objective import classify_scores, make_rows

from .conftest import CLASSIFY_ROWS, GENERATE_ROWS, write_jsonl

LABELS = make_labels(["good", "bad"])
METHODS = {  # name -> TrainConfig overrides
    "prompt-tuning": dict(method="prompt-tuning", template="Weather: {input} Verdict:"),
    "prompt-tuning-random": dict(method="prompt-tuning", init="random"),
    "prompt-tuning-vocab": dict(method="prompt-tuning", init="sample-vocab"),
    "p-tuning-mlp": dict(method="p-tuning", template="Weather: {input} Verdict:"),
    "p-tuning-lstm-anchors": dict(method="p-tuning", encoder="lstm", template="<v:2> Weather: {input} <v:2> Verdict:"),
    "prefix-tuning": dict(method="prefix-tuning", template="Weather: {input} Verdict:"),
    "prefix-tuning-mlp": dict(method="prefix-tuning", prefix_projection=True),
}


def cfg_for(name: str, out: Path, data: Path, task: str = "classify", **kw) -> TrainConfig:
    base = dict(task=task, data=data, out=out, labels=LABELS if task == "classify" else (), virtual_tokens=4,
                epochs=2, batch_size=4, seed=3, max_new_tokens=6, patience=10)
    base.update(METHODS[name])
    if name == "p-tuning-lstm-anchors":
        base.pop("virtual_tokens")
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- learning
@pytest.mark.parametrize("name", list(METHODS))
def test_loss_goes_down(name, tiny_lm, tmp_path, classify_file):
    lr = 1e-2 if name in ("p-tuning-mlp", "p-tuning-lstm-anchors", "prefix-tuning-mlp") else 5e-2
    result = train(cfg_for(name, tmp_path / "out", classify_file, epochs=3, lr=lr), lm=tiny_lm, quiet=True)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "out" / "task.json").is_file() and (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_generate_loss_goes_down_and_decodes(tiny_lm, tmp_path, generate_file):
    result = train(cfg_for("prefix-tuning", tmp_path / "out", generate_file, task="generate", epochs=3, lr=5e-2),
                   lm=tiny_lm, quiet=True)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0], losses
    assert {"exact_match", "token_f1"} <= set(result["history"][0])


# ---------------------------------------------------------------- train/serve parity
def _served_alone(lm, spec, tensors, text):
    """What a server computes for one request on its own: tok_start right after the row's prefix, batch of one."""
    plan = plan_row(spec, lm.tokenizer, text, with_labels=True)
    step, readout = build_prefill([plan], [plan.prefix], [tensors.virtual], torch.device("cpu"), torch.float32)
    cache = prefix_cache(lm.model, [tensors.prefix], plan.prefix)
    hidden = hidden_states(lm.model, step, cache)
    return label_scores(lm.model, hidden, readout)[0], last_logits(lm.model, hidden, readout)[0]


@pytest.mark.parametrize("name", ["prompt-tuning", "p-tuning-lstm-anchors", "prefix-tuning-mlp"])
def test_train_serve_parity(name, tiny_lm, tmp_path, classify_file):
    cfg = cfg_for(name, tmp_path / "out", classify_file, epochs=1, lr=5e-2)
    train(cfg, lm=tiny_lm, quiet=True)
    manifest, stored = read_artifact(tmp_path / "out")
    spec = manifest.spec()
    assert manifest.fingerprint["num_kv_heads"] == 2 and manifest.task_type == "classify"
    examples = load_jsonl(classify_file, "classify")[:9]
    rows = make_rows(spec, tiny_lm.tokenizer, examples, "classify", with_outputs=False)
    with torch.no_grad():
        # the trainer's batched scoring, on the tensors read back from disk
        trained = classify_scores(tiny_lm.model, rows, stored.virtual, stored.prefix)       # [n, K]
        for i, ex in enumerate(examples):
            scores, next_logits = _served_alone(tiny_lm, spec, stored, ex.input)
            torch.testing.assert_close(trained[i], scores, atol=1e-4, rtol=0)
            assert int(trained[i].argmax()) == int(scores.argmax())
            # and the batched prefill's next-token logits match the lone request's
            plan = rows[i].plan
            step, readout = build_prefill([r.plan for r in rows], [plan.prefix] * len(rows),
                                          [stored.virtual] * len(rows), torch.device("cpu"), torch.float32)
            if i == 0:
                hidden = hidden_states(tiny_lm.model, step, prefix_cache(tiny_lm.model, [stored.prefix] * len(rows),
                                                                         plan.prefix))
                batched_last = last_logits(tiny_lm.model, hidden, readout)
            torch.testing.assert_close(batched_last[i], next_logits, atol=1e-4, rtol=0)


def test_batched_decode_matches_one_by_one(tiny_lm, tmp_path, generate_file):
    train(cfg_for("prefix-tuning", tmp_path / "out", generate_file, task="generate", epochs=1), lm=tiny_lm,
          quiet=True)
    manifest, stored = read_artifact(tmp_path / "out")
    rows = make_rows(manifest.spec(), tiny_lm.tokenizer,
                     load_jsonl(generate_file, "generate")[:6] + [load_jsonl(generate_file, "generate")[0]],
                     "generate", with_outputs=False)
    rows[-1].plan.ids[-1:] = rows[-1].plan.ids[-1:] * 3  # a longer prompt in the same batch
    rows[-1].plan.virt[-1:] = [-1] * 3
    batched = greedy_decode(tiny_lm.model, tiny_lm.tokenizer, rows, None, stored.prefix, 8, 5)
    alone = greedy_decode(tiny_lm.model, tiny_lm.tokenizer, rows, None, stored.prefix, 1, 5)
    assert batched == alone


# ---------------------------------------------------------------- PEFT parity
@pytest.mark.parametrize("name", ["prompt-tuning", "p-tuning-mlp", "prefix-tuning", "prefix-tuning-mlp"])
def test_peft_parity(name, tiny_lm, tiny_dir, tmp_path, classify_file):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    train(cfg_for(name, tmp_path / "out", classify_file, epochs=1, lr=5e-2), lm=tiny_lm, quiet=True)
    manifest, stored = read_artifact(tmp_path / "out")
    spec = manifest.spec()
    base = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "out" / "peft").eval()
    text = "sunny warm 7"
    plan = plan_row(spec, tiny_lm.tokenizer, text)
    filled = spec.template.replace("{input}", text)
    input_ids = torch.tensor([tiny_lm.tokenizer(filled)["input_ids"]])
    with torch.no_grad():
        ours_step, _ = build_prefill([plan], [plan.prefix], [stored.virtual], torch.device("cpu"), torch.float32)
        hidden = hidden_states(tiny_lm.model, ours_step, prefix_cache(tiny_lm.model, [stored.prefix], plan.prefix))
        real = torch.tensor([v < 0 for v in plan.virt])
        ours = logits(tiny_lm.model, hidden[0, real])                               # [S, V]
        theirs = peft_model(input_ids=input_ids).logits[0].float()                  # [T+S, V] or [S, V]
    theirs = theirs[-ours.shape[0]:]
    assert ours.shape[0] == input_ids.shape[1]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_anchored_p_tuning_has_no_peft_export(tiny_lm, tmp_path, classify_file):
    train(cfg_for("p-tuning-lstm-anchors", tmp_path / "out", classify_file, epochs=1), lm=tiny_lm, quiet=True)
    assert (tmp_path / "out" / "task.json").is_file()
    assert not (tmp_path / "out" / "peft").exists()


# ---------------------------------------------------------------- determinism and resume
def test_deterministic_and_resume_continues_where_it_stopped(tiny_lm, tmp_path, classify_file):
    full = cfg_for("p-tuning-mlp", tmp_path / "full", classify_file, epochs=2, lr=1e-2)
    train(full, lm=tiny_lm, quiet=True)
    again = cfg_for("p-tuning-mlp", tmp_path / "again", classify_file, epochs=2, lr=1e-2)
    train(again, lm=tiny_lm, quiet=True)
    ref = load_file(str(tmp_path / "full" / "prompt.safetensors"))["virtual"]
    assert torch.equal(ref, load_file(str(tmp_path / "again" / "prompt.safetensors"))["virtual"])

    # 24 examples, 19 train / 5 held out, batch 4: 5 steps per epoch; stop mid-epoch 2, then resume
    part = cfg_for("p-tuning-mlp", tmp_path / "part", classify_file, epochs=2, lr=1e-2, max_steps=7)
    stopped = train(part, lm=tiny_lm, quiet=True)
    assert stopped == {"stopped_at_step": 7, "finished": False}
    assert not (tmp_path / "part" / "prompt.safetensors").exists()
    resumed = cfg_for("p-tuning-mlp", tmp_path / "part", classify_file, epochs=2, lr=1e-2, resume=True)
    result = train(resumed, lm=tiny_lm, quiet=True)
    assert result["finished"] and [h["epoch"] for h in result["history"]] == [1, 2]
    torch.testing.assert_close(load_file(str(tmp_path / "part" / "prompt.safetensors"))["virtual"], ref,
                               atol=1e-6, rtol=0)
    steps = [r["step"] for r in read_log(tmp_path / "part") if r["type"] == "step"]
    assert steps == list(range(1, 11))
    with pytest.raises(ValueError, match="belongs to another run .*seed"):
        train(cfg_for("p-tuning-mlp", tmp_path / "part", classify_file, epochs=2, lr=1e-2, seed=4, resume=True),
              lm=tiny_lm, quiet=True)
    full_log = [r["loss"] for r in read_log(tmp_path / "full") if r["type"] == "step"]
    part_log = [r["loss"] for r in read_log(tmp_path / "part") if r["type"] == "step"]
    assert part_log == pytest.approx(full_log, abs=1e-6)


def test_early_stopping(tiny_lm, tmp_path, classify_file):
    result = train(cfg_for("prompt-tuning", tmp_path / "out", classify_file, epochs=8, lr=1e-9, patience=1),
                   lm=tiny_lm, quiet=True)
    assert result["stopped_early"] and result["epochs_run"] == 2 and result["best_epoch"] == 1


# ---------------------------------------------------------------- bad data
@pytest.mark.parametrize("line, message", [
    ('{"input": "x", "label": "good"', "not valid JSON"),
    ('["input", "label"]', "expected a JSON object"),
    ('{"input": "x"}', "missing field 'label'"),
    ('{"input": 3, "label": "good"}', "field 'input' must be a string"),
    ('{"input": "  ", "label": "good"}', "field 'input' is empty"),
    ('{"input": "x", "label": "meh"}', "label 'meh' is not one of ['bad', 'good']"),
])
def test_bad_data_names_file_and_line(line, message, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [CLASSIFY_ROWS[0], "", line])
    with pytest.raises(ValueError) as err:
        load_jsonl(path, "classify", {"good", "bad"})
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    rc = cli_main(["train", "--method", "prompt-tuning", "--task", "classify", "--data", str(path), "--labels",
                   "good,bad", "--out", str(tmp_path / "o")])
    assert rc == 2 and f"{path}:3: " in capsys.readouterr().err


def test_generate_data_needs_output(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [GENERATE_ROWS[0], {"input": "a", "label": "b"}])
    with pytest.raises(ValueError, match=r"g\.jsonl:2: missing field 'output'"):
        load_jsonl(path, "generate")


# ---------------------------------------------------------------- CLI, eval and push
class _Stub(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Stub.seen.append((self.path, dict(self.headers), body))
        payload = json.dumps({"id": "demo", "version": 1}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _multipart(headers: dict, body: bytes) -> dict:
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in msg.iter_parts()}


def test_cli_train_eval_and_push(tiny_dir, tmp_path, classify_file, capsys):
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    out = tmp_path / "demo"
    try:
        rc = cli_main(["train", "--method", "prompt-tuning", "--task", "classify", "--data", str(classify_file),
                       "--out", str(out), "--model", str(tiny_dir), "--labels", "good,bad", "--template",
                       "Weather: {input}\nVerdict:", "--virtual-tokens", "3", "--epochs", "1", "--batch-size", "8",
                       "--push", url, "--api-key", "sk-test", "--task-id", "demo"])
    finally:
        server.shutdown()
    assert rc == 0
    for name in ("task.json", "prompt.safetensors", "peft/adapter_config.json", "log.jsonl", "curves.png",
                 "results.json", "checkpoint/trainer.safetensors"):
        assert (out / name).is_file(), name
    # the PEFT copy names a base model AutoPeftModelForCausalLM can load, not a bare "default"
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == str(Path(tiny_dir).resolve())
    path, headers, body = _Stub.seen[-1]
    assert path == "/v1/tasks" and headers["Authorization"] == "Bearer sk-test"
    fields = _multipart(headers, body)
    assert fields["task_id"] == b"demo"
    assert json.loads(fields["metadata"]) == {"task_type": "classify", "template": "Weather: {input}\nVerdict:",
                                              "description": "prompt-tuning (classify)", "visibility": "private",
                                              "labels": {"good": " good", "bad": " bad"}}
    with zipfile.ZipFile(BytesIO(fields["adapter"])) as zf:
        assert sorted(zf.namelist()) == ["prompt.safetensors", "task.json"]
        assert json.loads(zf.read("task.json"))["id"] == "demo"
    capsys.readouterr()

    assert cli_main(["eval", "--prompt", str(out), "--data", str(classify_file), "--model", str(tiny_dir)]) == 0
    soft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= soft["accuracy"] <= 100
    assert cli_main(["eval", "--template", "Weather: {input}\nVerdict:", "--data", str(classify_file), "--labels",
                     "good,bad", "--model", str(tiny_dir)]) == 0
    hard = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= hard["accuracy"] <= 100
    gen = write_jsonl(tmp_path / "g.jsonl", GENERATE_ROWS[:4])
    assert cli_main(["eval", "--template", "{input} ->", "--data", str(gen), "--model", str(tiny_dir),
                     "--max-new-tokens", "3"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) >= {"exact_match", "token_f1"}


def test_max_steps_with_push_says_why_nothing_was_pushed_and_resume_pushes(tiny_dir, tmp_path, classify_file,
                                                                         capsys):
    """--max-steps ends before the export, so --push cannot happen yet: said on stderr; --resume trains on and
    pushes; after a failed push, --resume only exports and pushes again (no more steps)."""
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    out = tmp_path / "part"
    args = ["train", "--method", "prompt-tuning", "--task", "classify", "--data", str(classify_file), "--out",
            str(out), "--model", str(tiny_dir), "--labels", "good,bad", "--virtual-tokens", "2", "--epochs", "1",
            "--batch-size", "8", "--api-key", "sk-test", "--task-id", "part"]
    before = len(_Stub.seen)
    try:
        assert cli_main([*args, "--max-steps", "1", "--push", url]) == 0
        err = capsys.readouterr().err
        assert "not pushed: training stopped at step 1" in err and "--resume" in err
        assert len(_Stub.seen) == before and not (out / "task.json").exists()
        assert cli_main([*args, "--resume", "--push", "http://127.0.0.1:9"]) == 2  # trained to the end; push fails
        assert "push to http://127.0.0.1:9/v1/tasks failed" in capsys.readouterr().err
        steps = (out / "log.jsonl").read_text().count('"type": "step"')
        assert steps >= 2  # the resumed run did train on past step 1
        assert cli_main([*args, "--resume", "--push", url]) == 0
        assert len(_Stub.seen) == before + 1 and _Stub.seen[-1][0] == "/v1/tasks"
        assert (out / "log.jsonl").read_text().count('"type": "step"') == steps  # only pushed again
    finally:
        server.shutdown()


@pytest.mark.parametrize("epochs", [1, 3])
def test_curves_show_whole_epochs(tmp_path, epochs):
    """The held-out panel's x axis covers every epoch with integer ticks (one epoch once spanned 0.96 to 1.04)."""
    import matplotlib.pyplot as plt

    from training.curves import RunLog, curves_figure

    log = RunLog(tmp_path, fresh=True)
    for e in range(1, epochs + 1):
        log.write(type="step", epoch=e - 1, step=e, loss=1.0 / e)
        log.write(type="epoch", epoch=e, step=e, train_loss=1.0 / e, accuracy=50.0 + e)
    fig = curves_figure(tmp_path, "t")
    held = fig.axes[1]
    lo, hi = held.get_xlim()
    ticks = [t for t in held.get_xticks() if lo <= t <= hi]
    plt.close(fig)
    assert lo <= 0.5 and hi >= epochs + 0.5
    assert ticks and all(float(t).is_integer() for t in ticks) and set(range(1, epochs + 1)) <= set(ticks)


def test_push_failure_is_a_clear_error(tmp_path):
    from training.push import push

    (tmp_path / "task.json").write_text("{}")
    with pytest.raises(ValueError, match="push to http://127.0.0.1:9/v1/tasks failed"):
        push(tmp_path, "http://127.0.0.1:9", "k", "t", timeout=2)


# ---------------------------------------------------------------- two processes (gloo)
def test_two_cpu_processes_match_one(tiny_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of every global batch and DDP averages the gradients,
    so the prompt equals a one-process run with the whole batch."""
    import os
    import subprocess
    import sys

    train_file = write_jsonl(tmp_path / "train.jsonl", CLASSIFY_ROWS[:16])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", CLASSIFY_ROWS[16:])
    common = ["--method", "p-tuning", "--task", "classify", "--data", str(train_file), "--eval", str(eval_file),
              "--model", str(tiny_dir), "--labels", "good,bad", "--epochs", "2", "--virtual-tokens", "4",
              "--device", "cpu", "--lr", "1e-2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training", "train",
           "--out", str(tmp_path / "ddp"), "--batch-size", "4"] + common
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # a hung rendezvous must not leave workers behind
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    assert "2 process(es) (gloo)" in stdout
    assert cli_main(["train", "--out", str(tmp_path / "one"), "--batch-size", "8"] + common) == 0
    two = load_file(str(tmp_path / "ddp" / "prompt.safetensors"))["virtual"]
    one = load_file(str(tmp_path / "one" / "prompt.safetensors"))["virtual"]
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)


def test_labels_from_verbalizers_file_or_data(tmp_path, classify_file):
    from training.data import resolve_labels

    verb = tmp_path / "verb.json"
    verb.write_text(json.dumps({"good": " fine", "bad": " awful"}))
    assert [(lab.name, lab.verbalizer) for lab in resolve_labels(None, verb)] == [("good", " fine"), ("bad", " awful")]
    assert [lab.name for lab in resolve_labels(None, None, load_jsonl(classify_file, "classify"))] == ["bad", "good"]
    verb.write_text("[1, 2]")
    with pytest.raises(ValueError, match="verb.json: expected a JSON object"):
        resolve_labels(None, verb)


def test_training_never_imports_the_server():
    import subprocess
    import sys

    code = ("import sys, training.cli, training.loop, training.push; "
            "sys.exit(any(m == 'server' or m.startswith('server.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_eval_refuses_an_artifact_of_another_model(tiny_lm, tmp_path, classify_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prompt_core.model import LoadedModel, freeze
    from training.score import artifact_eval

    from .conftest import TINY

    train(cfg_for("prompt-tuning", tmp_path / "out", classify_file, epochs=1), lm=tiny_lm, quiet=True)
    torch.manual_seed(1)
    other = LoadedModel(model=freeze(LlamaForCausalLM(LlamaConfig(**TINY))), tokenizer=tiny_lm.tokenizer,
                        source="other", device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="trained on another base model: embedding_sha256"):
        artifact_eval(str(tmp_path / "out"), str(classify_file), other)
    assert artifact_eval(str(tmp_path / "out"), str(classify_file), tiny_lm)["predictions"][0] in ("good", "bad")
