"""JobRunner across processes (training/jobs/runner.py, control.py, store.py), on a server holding a tiny random
Llama: a server killed mid-job (kill -9) leaves a lease that the next runner on the same store takes over, resuming
from the last checkpoint to the very prompt an uninterrupted run trains; SIGTERM checkpoints the running job and
puts it back in the queue for any runner. The jobs are made and watched through the openai client, as a user would.
"""

from __future__ import annotations

import json
import time

import openai
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from training.config import TrainConfig
from training.loop import train

from .helpers import CLASSIFY, jsonl, wait_job


def test_kill_9_mid_job_resumes_from_its_checkpoint(tmp_path, tiny_dir):
    """The server dies mid-job (SIGKILL, no chance to clean up); a new server on the same store resumes the job from
    its last checkpoint, and the prompt equals an uninterrupted run's: nothing lost, nothing trained twice."""
    from scripts.common import ServerProcess

    store = tmp_path / "kill-store"
    args = ("--model", str(tiny_dir), "--dtype", "float32", "--threads", "1", "--training-checkpoint-s", "0.2")
    method = {"type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {
        "n_epochs": 30, "batch_size": 2, "num_virtual_tokens": 4, "patience": 1000}}}
    first = ServerProcess(store, *args)
    try:
        client = openai.OpenAI(base_url=first.url + "/v1", api_key="none", max_retries=0)
        f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="default", training_file=f.id, seed=3, method=method)
        deadline = time.monotonic() + 120
        while client.fine_tuning.jobs.retrieve(job.id).model_extra["step"] < 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        first.close()  # SIGKILL
    killed = json.loads((store / "fine_tuning" / job.id / "job.json").read_text())
    assert killed["status"] == "running" and killed["step"] < killed["total_steps"]

    second = ServerProcess(store, *args)
    try:
        client = openai.OpenAI(base_url=second.url + "/v1", api_key="none", max_retries=0)
        done = wait_job(client, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
        assert any(m.startswith("resuming (attempt 2)") for m in messages)
        resumed_log = (store / "fine_tuning" / job.id / "run" / "log.jsonl").read_text().splitlines()
    finally:
        second.close()
    served = load_file(str(next((store / "tasks" / done.fine_tuned_model).glob("v*/prompt.safetensors"))))

    from transformers import AutoModelForCausalLM

    from prompt_core.model import LoadedModel, freeze
    lm = LoadedModel(model=freeze(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32,
                                                                       attn_implementation="sdpa")),
                     tokenizer=AutoTokenizer.from_pretrained(tiny_dir), source="tiny", device=torch.device("cpu"),
                     dtype=torch.float32)
    from prompt_core.spec import make_labels
    data = tmp_path / "kill-data.jsonl"
    data.write_bytes(jsonl(CLASSIFY))
    whole = train(TrainConfig(method="prompt-tuning", task="classify", data=data, out=tmp_path / "kill-cli",
                              labels=make_labels(["bad", "good"]), epochs=30, batch_size=2, virtual_tokens=4,
                              patience=1000, seed=3, device="cpu"), lm=lm, quiet=True)
    reference = load_file(str(tmp_path / "kill-cli" / "prompt.safetensors"))
    assert torch.allclose(served["virtual"], reference["virtual"], atol=1e-5)
    assert done.model_extra["result"]["best_score"] == whole["best_score"]
    # the steps after the last checkpoint were trained again, but the log holds each step's final record
    steps = [json.loads(x)["step"] for x in resumed_log if '"type": "step"' in x]
    assert steps[-1] == killed["total_steps"] and len(set(steps)) == killed["total_steps"]


def test_sigterm_checkpoints_the_running_job_and_requeues_it(tmp_path, tiny_dir):
    import signal

    from scripts.common import ServerProcess

    store = tmp_path / "term-store"
    proc = ServerProcess(store, "--model", str(tiny_dir), "--threads", "1", "--shutdown-grace-s", "1")
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0)
        f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="default", training_file=f.id, method={
            "type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epochs": 500, "patience": 500,
                                                                           "batch_size": 1}}})
        deadline = time.monotonic() + 60
        while client.fine_tuning.jobs.retrieve(job.id).model_extra["step"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.wait_for(r"training\.jobs: ftjob-\S+: step \d+/\d+: training loss", 30)  # progress in the log
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=60) == 0
    finally:
        proc.close()
    rec = json.loads((store / "fine_tuning" / job.id / "job.json").read_text())
    state = json.loads((store / "fine_tuning" / job.id / "run" / "checkpoint" / "state.json").read_text())
    assert rec["status"] == "queued" and rec["lease_owner"] is None  # any runner may take it on from here
    assert state["state"]["global_step"] >= rec["step"] >= 5
    events = (store / "fine_tuning" / job.id / "events.jsonl").read_text()
    assert "paused at step" in events
