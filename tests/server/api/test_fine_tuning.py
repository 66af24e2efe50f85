"""Fine-tuning jobs (/v1/fine_tuning/jobs) through the official `openai` client, on a live server holding a tiny
random Llama (so a job trains in seconds on two shared cores); one test trains on the default model and a shipped
example.

What matters here: line-numbered refusals before queuing, quotas, tenant isolation of files and jobs, a job whose
`fine_tuned_model` serves at once on every endpoint with the same prompt the CLI trains from the same data, seed and
settings, events and checkpoints, cancellation, and a training worker for a server that does not train. Files are
test_files.py's; the runner across processes (kill -9, SIGTERM) is tests/training/jobs/test_runner.py's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file

from server.config import Settings
from tests.training.jobs.helpers import CLASSIFY, GENERATE, jsonl, save_tiny_llama, wait_job
from training.config import TrainConfig
from training.loop import train

from .conftest import ACME, ADMIN, GLOBEX, LiveServer, assert_error, write_auth_file


@pytest.fixture(scope="module")
def tiny_dir(module_tmp) -> Path:
    return save_tiny_llama(module_tmp / "tiny-llama")


def tiny_settings(tmp: Path, tiny_dir: Path, **overrides) -> Settings:
    tmp.mkdir(parents=True, exist_ok=True)
    return Settings(store=tmp / "store", model=str(tiny_dir), device="cpu", dtype="float32", threads=1,
                    auth_file=write_auth_file(tmp / "auth.json"), **overrides)


@pytest.fixture(scope="module")
def server(module_tmp, tiny_dir):
    s = LiveServer(tiny_settings(module_tmp / "srv", tiny_dir, max_file_bytes=20_000,
                                 max_file_bytes_per_tenant=60_000, max_jobs_per_tenant=2,
                                 training_checkpoint_s=0.5)).start()
    try:
        yield s
    finally:
        s.stop()


def oai(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


# ---------------------------------------------------------------- jobs

def cli_run(server, tmp: Path, data: bytes, **kw) -> dict:
    """The same training through training.loop.train (the CLI's function) on the server's own model."""
    path = tmp / "cli-data.jsonl"
    path.write_bytes(data)
    cfg = TrainConfig(data=path, out=tmp / "cli-out", device="cpu", **kw)
    result = train(cfg, lm=server.runtime.loaded, quiet=True)
    return {"result": result, "tensors": load_file(str(tmp / "cli-out" / "prompt.safetensors"))}


def test_classify_job_serves_at_once_and_equals_the_cli(server, tmp_path):
    client = oai(server, ACME)
    f = client.files.create(file=("topics.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="default", training_file=f.id, suffix="weather", seed=7,
        method={"type": "prompt_tuning", "prompt_tuning": {
            "hyperparameters": {"n_epochs": 2, "learning_rate": 0.03, "batch_size": 8, "num_virtual_tokens": 4},
            "task_type": "classify", "labels": ["good", "bad"], "template": "Text: {input}\nWeather:"}})
    assert job.status in ("queued", "running") and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 2 and job.seed == 7
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    task_id = job.fine_tuned_model
    assert task_id.startswith("ft-weather-") and job.trained_tokens > 0 and job.finished_at >= job.created_at

    # usable at once, everywhere, owned by the tenant, carrying the data's labels and template
    with server.client(ACME) as c:
        task = c.get(f"/v1/tasks/{task_id}").json()
        assert task["owner"] == "acme" and task["kind"] == "prompt_tuning" and task["task_type"] == "classify"
        assert task["template"] == "Text: {input}\nWeather:" and [x["name"] for x in task["labels"]] == ["good", "bad"]
        assert job.id in task["description"] and "held-out accuracy" in task["description"]
        preds = c.post(f"/v1/tasks/{task_id}/classify", json={"input": [r["input"] for r in CLASSIFY]}).json()
        assert c.get(f"/v1/tasks/{task_id}/export").status_code == 200
    comp = client.completions.create(model=task_id, prompt="sunny warm 9", max_tokens=2)
    assert comp.model.startswith(task_id)
    assert task_id in [m.id for m in client.models.list()]
    with server.client(GLOBEX) as other:  # private to acme
        assert_error(other.get(f"/v1/tasks/{task_id}"), 404)

    # the same prompt as `python -m training train` with the same data, seed and settings
    from prompt_core.spec import make_labels
    cli = cli_run(server, tmp_path, jsonl(CLASSIFY), method="prompt-tuning", task="classify", epochs=2, lr=0.03,
                  batch_size=8, virtual_tokens=4, seed=7, labels=make_labels(["good", "bad"]),
                  template="Text: {input}\nWeather:")
    served = server.runtime.store.tensors(server.runtime.store.get(task_id, None, admin=True))
    # micro-batches sum each step's gradient in another order: measured 3.3e-6 apart on values ~0.1 (1e-6 failed)
    assert torch.allclose(served.virtual.cpu(), cli["tensors"]["virtual"], atol=1e-4)
    # the server splits each step into micro-batches (serving waits for at most one), so losses agree to rounding
    for served_epoch, cli_epoch in zip(job.model_extra["result"]["history"], cli["result"]["history"], strict=True):
        assert served_epoch["accuracy"] == cli_epoch["accuracy"] and served_epoch["step"] == cli_epoch["step"]
        assert served_epoch["train_loss"] == pytest.approx(cli_epoch["train_loss"], rel=1e-5)
    acc = 100.0 * sum(p["label"] == r["label"] for p, r in zip(preds, CLASSIFY)) / len(CLASSIFY)
    assert acc >= 50.0  # the tiny random model; the exact figure is the CLI's, checked by the tensors above

    # events: progress with step, loss and ETA; each epoch's held-out accuracy; the end
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].message.startswith("succeeded")
    steps = [e for e in events if e.type == "metrics" and "train_loss" in e.data and "total_steps" in e.data]
    assert steps and all("estimated_finish" in e.data for e in steps)
    epochs = [e.data for e in events if "accuracy" in (e.data or {}) and "epoch" in e.data]
    assert sorted(e["epoch"] for e in epochs) == [1, 2]
    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [6, 3] and "accuracy" in ckpts[0].metrics.model_extra
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]


def test_generate_job_from_prompt_completion_lines(server):
    client = oai(server, GLOBEX)
    f = client.files.create(file=("people.jsonl", jsonl(GENERATE)), purpose="fine-tune")
    v = client.files.create(file=("valid.jsonl", jsonl(GENERATE[:4])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="default", training_file=f.id, validation_file=v.id,
                                         method={"type": "prefix_tuning", "prefix_tuning": {
                                             "hyperparameters": {"n_epochs": 1, "batch_size": 8},
                                             "template": "Text: {input}\nAnswer:"}})
    assert job.method.model_extra["prefix_tuning"]["task_type"] == "generate"
    assert job.hyperparameters.model_extra["learning_rate"] == 1e-2  # the CLI's default for prefix tuning
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.model_extra["result"]["heldout_examples"] == 4
    comp = client.completions.create(model=job.fine_tuned_model, prompt="Ann is 20", max_tokens=4)
    assert comp.choices[0].finish_reason in ("length", "stop")
    with server.client(GLOBEX) as c:
        out = c.post(f"/v1/tasks/{job.fine_tuned_model}/generate", json={"input": "Ann is 20", "max_new_tokens": 3})
        assert out.status_code == 200 and c.get(f"/v1/tasks/{job.fine_tuned_model}").json()["kind"] == "prefix_tuning"


def test_cancel_mid_job_and_the_job_quota(server):
    from .conftest import METERED
    client = oai(server, METERED)
    f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
    long = {"type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epochs": 5000, "batch_size": 1,
                                                                    "patience": 5000}}}
    first = client.fine_tuning.jobs.create(model="default", training_file=f.id, method=long)
    second = client.fine_tuning.jobs.create(model="default", training_file=f.id, method=long)
    with pytest.raises(openai.RateLimitError) as err:  # two queued or running jobs per tenant here
        client.fine_tuning.jobs.create(model="default", training_file=f.id, method=long)
    assert "cancel one" in str(err.value)
    queued = client.fine_tuning.jobs.cancel(second.id)  # waiting behind the first: cancelled at once
    assert queued.status == "cancelled"
    deadline = time.monotonic() + 120
    while client.fine_tuning.jobs.retrieve(first.id).model_extra["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.fine_tuning.jobs.cancel(first.id).status == "running"  # stops at its next step
    job = wait_job(client, first.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.finished_at
    assert job.model_extra["step"] < job.model_extra["total_steps"]
    with server.client(METERED) as c:
        assert_error(c.post(f"/v1/fine_tuning/jobs/{first.id}/cancel"), 409, "conflict")
        assert not [t for t in c.get("/v1/tasks").json()["data"] if t["owner"] == "metered"]
    assert client.fine_tuning.jobs.list_events(first.id).data[0].message == "cancelled"


def test_job_requests_are_checked_before_queueing(server):
    client = oai(server, ACME)
    f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY + [{"input": "odd", "label": "meh"}])),
                            purpose="fine-tune")
    before = len(client.fine_tuning.jobs.list().data)
    cases = [
        ({"method": {"type": "prompt_tuning", "prompt_tuning": {"labels": ["good", "bad"]}}},
         f"{f.id}:25: label 'meh' is not one of ['bad', 'good']"),
        ({"method": {"type": "lora"}}, "method.type expected one of"),
        ({"method": {"type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epoch": 2}}}},
         "unknown fields ['n_epoch']"),
        ({"method": {"type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"batch_size": 0}}}},
         "--batch-size must be positive"),
        ({"method": {"type": "prompt_tuning", "prompt_tuning": {"task_type": "generate"}}},
         "training_file holds classify lines"),
        ({"method": {"type": "p_tuning", "p_tuning": {"template": "no slot"}}}, "{input}"),
        ({"suffix": "a b"}, "suffix expected"),
    ]
    with server.client(ACME) as c:
        for extra, message in cases:
            body = {"model": "default", "training_file": f.id, **extra}
            err = assert_error(c.post("/v1/fine_tuning/jobs", json=body), 422, "invalid_request")
            assert message in err["message"], (extra, err)
        assert_error(c.post("/v1/fine_tuning/jobs", json={"model": "default", "training_file": "file-nope"}), 404)
        # model is 'default' or a task of the caller to continue
        assert_error(c.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o", "training_file": f.id}), 404)
    assert len(client.fine_tuning.jobs.list().data) == before


def test_metrics_count_jobs_by_state_and_training_tokens(server):
    client = oai(server, GLOBEX)
    f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
    wait_job(client, client.fine_tuning.jobs.create(model="default", training_file=f.id, method={
        "type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epochs": 1}}}).id)
    with server.client() as c:
        text = c.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith(("promptserve_fine_tuning", "promptserve_training"))}
    succeeded = sum(j.status == "succeeded" for j in oai(server, ADMIN).fine_tuning.jobs.list(limit=1000))
    assert values['promptserve_fine_tuning_jobs{state="succeeded"}'] == succeeded >= 1
    assert values["promptserve_fine_tuning_queue_length"] == 0
    assert values["promptserve_training_tokens_total"] > 0 and values["promptserve_training_tokens_per_second"] > 0


def test_a_job_continues_a_task_of_the_tenant(server):
    """`model` naming a task: its kind, template, labels and size are the defaults and its prompt the start (with a
    vanishing learning rate the result is the task's own prompt)."""
    client = oai(server, ACME)
    f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
    base = wait_job(client, client.fine_tuning.jobs.create(model="default", training_file=f.id, method={
        "type": "prefix_tuning", "prefix_tuning": {"hyperparameters": {"n_epochs": 1, "num_virtual_tokens": 3},
                                                   "template": "Q: {input}\nA:", "labels": ["good", "bad"]}}).id)
    job = wait_job(client, client.fine_tuning.jobs.create(
        model=base.fine_tuned_model, training_file=f.id,
        hyperparameters={"n_epochs": 1, "learning_rate_multiplier": 1e-9}).id)
    assert job.status == "succeeded", job.error
    spec = job.method.model_extra["prefix_tuning"]
    assert spec["template"] == "Q: {input}\nA:" and [x["name"] for x in spec["labels"]] == ["good", "bad"]
    store = server.runtime.store
    before = store.tensors(store.get(base.fine_tuned_model, None, admin=True)).prefix
    after = store.tensors(store.get(job.fine_tuned_model, None, admin=True)).prefix
    assert torch.allclose(before, after, atol=1e-5)
    with server.client(ACME) as c:  # what cannot be continued is refused before queueing
        c.post("/v1/tasks", json={"task_id": "acme-hard", "kind": "hard", "template": "Q: {input}"})
        for body, message in (({"model": "acme-hard"}, "no trained tensors"),
                              ({"model": base.fine_tuned_model, "method": {"type": "prompt_tuning"}},
                               "cannot continue"),
                              ({"model": base.fine_tuned_model, "method": {"type": "prefix_tuning", "prefix_tuning": {
                                  "hyperparameters": {"num_virtual_tokens": 5}}}}, "must stay 3")):
            err = assert_error(c.post("/v1/fine_tuning/jobs", json={"training_file": f.id, **body}), 422)
            assert message in err["message"]
    with server.client(GLOBEX) as other:  # another tenant's task is not there to continue
        g = other.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", jsonl(CLASSIFY))})
        assert_error(other.post("/v1/fine_tuning/jobs", json={"model": base.fine_tuned_model,
                                                              "training_file": g.json()["id"]}), 404)


def test_auto_job_searches_and_publishes_the_winner(server):
    client = oai(server, GLOBEX)
    f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
    job = wait_job(client, client.fine_tuning.jobs.create(model="default", training_file=f.id, method={
        "type": "auto", "auto": {"hyperparameters": {"n_epochs": 1, "time_budget_s": 600}}}).id)
    assert job.status == "succeeded", job.error
    result = job.model_extra["result"]
    names = [c["name"] for c in result["candidates"]]
    scored = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if "candidate" in e.data]
    assert sorted(d["candidate"] for d in scored) == sorted(names)          # every candidate's score, in events
    best = max(result["candidates"], key=lambda c: c["score"])
    assert result["winner"] == best["name"]
    with server.client(GLOBEX) as c:
        task = c.get(f"/v1/tasks/{job.fine_tuned_model}").json()
    assert task["kind"] == best["method"].replace("-", "_") and best["name"] in task["description"]
    with server.client(GLOBEX) as c:
        err = assert_error(c.post("/v1/fine_tuning/jobs", json={"model": "default", "training_file": f.id, "method": {
            "type": "auto", "auto": {"hyperparameters": {"learning_rate": 0.1}}}}), 422)
        assert "chooses the method and learning rate" in err["message"]


def test_isolation_matrix_for_files_and_jobs(server):
    acme, globex, admin = oai(server, ACME), oai(server, GLOBEX), oai(server, ADMIN)
    f = acme.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model="default", training_file=f.id, method={
        "type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epochs": 1}}})
    for call in (lambda: globex.files.retrieve(f.id), lambda: globex.files.content(f.id),
                 lambda: globex.files.delete(f.id),
                 lambda: globex.fine_tuning.jobs.create(model="default", training_file=f.id),
                 lambda: globex.fine_tuning.jobs.retrieve(job.id), lambda: globex.fine_tuning.jobs.cancel(job.id),
                 lambda: globex.fine_tuning.jobs.list_events(job.id),
                 lambda: globex.fine_tuning.jobs.checkpoints.list(job.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in globex.files.list()]
    assert job.id not in [j.id for j in globex.fine_tuning.jobs.list(limit=100)]
    # an admin sees every tenant's files and jobs
    assert f.id in [x.id for x in admin.files.list()] and admin.files.retrieve(f.id).id == f.id
    assert job.id in [j.id for j in admin.fine_tuning.jobs.list(limit=100)]
    done = wait_job(acme, job.id)
    assert done.status == "succeeded" and acme.files.retrieve(f.id).id == f.id  # untouched by the attempts
    with server.client(GLOBEX) as c:
        assert_error(c.post(f"/v1/tasks/{done.fine_tuned_model}/classify", json={"input": "x"}), 404)


def test_default_model_on_the_shipped_example_scores_as_the_cli(module_tmp):
    """The default model and the emotion example (its first 24 lines, one epoch, to stay quick): a job through the
    openai client and the CLI with the same data, seed and settings give the same prompt and the same test accuracy,
    the job's measured through the server's classify endpoint."""
    from prompt_core.spec import make_labels
    from training.score import artifact_eval

    from .conftest import live_server

    root = Path(__file__).resolve().parents[3] / "training" / "examples" / "emotion"
    train_bytes = b"".join(root.joinpath("train.jsonl").read_bytes().splitlines(keepends=True)[:24])
    test_rows = [json.loads(x) for x in root.joinpath("test.jsonl").read_text().splitlines() if x.strip()]
    template, labels = "Sentence: {input}\nEmotion:", ["joy", "anger", "fear", "sadness"]
    with live_server(module_tmp / "default-model", threads=1) as server:
        client = oai(server, ACME)
        f = client.files.create(file=("emotion.jsonl", train_bytes), purpose="fine-tune")
        job = wait_job(client, client.fine_tuning.jobs.create(model="default", training_file=f.id, seed=7, method={
            "type": "prompt_tuning", "prompt_tuning": {
                "hyperparameters": {"n_epochs": 1, "batch_size": 8, "num_virtual_tokens": 8},
                "task_type": "classify", "labels": labels, "template": template}}).id)
        assert job.status == "succeeded", job.error
        with server.client(ACME) as c:
            preds = c.post(f"/v1/tasks/{job.fine_tuned_model}/classify",
                           json={"input": [r["input"] for r in test_rows[:32]]}).json()
        served = 100.0 * sum(p["label"] == r["label"] for p, r in zip(preds, test_rows)) / len(preds)
        cli = cli_run(server, module_tmp, train_bytes, method="prompt-tuning", task="classify", epochs=1,
                      batch_size=8, virtual_tokens=8, seed=7, labels=make_labels(labels), template=template)
        test_file = module_tmp / "emotion-test.jsonl"
        test_file.write_text("".join(json.dumps(r) + "\n" for r in test_rows[:32]))
        cli_test = artifact_eval(str(module_tmp / "cli-out"), str(test_file), server.runtime.loaded)
        stored = server.runtime.store.tensors(server.runtime.store.get(job.fine_tuned_model, None, admin=True))
        # the job (on the server's thread, between requests) and the CLI differ by 6.9e-6 at most when this runs
        # alone, every time; late in a full suite one run of five went past 1e-5. 1e-4 is still the same prompt
        # (its values are ~0.1), and the accuracy below must be equal.
        assert torch.allclose(stored.virtual.cpu(), cli["tensors"]["virtual"], atol=1e-4)
    assert served == pytest.approx(cli_test["accuracy"])
    assert job.model_extra["result"]["best_score"] == cli["result"]["best_score"]


def test_a_worker_trains_jobs_of_a_server_that_does_not(module_tmp, tiny_dir):
    """Scale-out: the server (`--no-training-runner`) queues; `python -m training worker` on the same store trains;
    the server serves the result."""
    import threading

    from training.worker import run_worker

    server = LiveServer(tiny_settings(module_tmp / "scale", tiny_dir, training_runner=False)).start()
    stop = threading.Event()
    worker = None
    try:
        client = oai(server, ACME)
        f = client.files.create(file=("t.jsonl", jsonl(CLASSIFY)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="default", training_file=f.id, method={
            "type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"n_epochs": 1}}})
        time.sleep(1.0)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"  # nobody here trains
        worker = threading.Thread(target=run_worker, kwargs=dict(store=module_tmp / "scale" / "store",
                                                                 model=str(tiny_dir), device="cpu", stop=stop))
        worker.start()
        done = wait_job(client, job.id)
        assert done.status == "succeeded", done.error
        deadline = time.monotonic() + 30
        with server.client(ACME) as c:  # the server sees the worker's task at its next store poll
            while (r := c.post(f"/v1/tasks/{done.fine_tuned_model}/classify", json={"input": "sunny"})).status_code \
                    == 404:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert r.status_code == 200 and r.json()["label"] in ("good", "bad")
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert events[0].startswith("succeeded")
    finally:
        stop.set()
        if worker is not None:
            worker.join(60)
        server.stop()
