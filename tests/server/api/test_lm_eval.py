"""lm-evaluation-harness itself, with its default `local-completions` settings (token-id requests, echo+logprobs
for log-likelihoods), against a live server on two small local tasks: a multiple-choice task on a soft-prompt task
and a generate_until task. Its numbers must be the ones our own endpoints give on the same data."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from lm_eval import simple_evaluate  # a dev dependency (lm-eval[api])
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager

from prompt_core.model import ensure_default_model_dir

from .conftest import live_server, native_soft_prompt, pack, upload

REVIEWS = [("A wonderful, moving film with a brilliant cast.", 0), ("Boring, predictable and far too long.", 1),
           ("I loved every minute of it.", 0), ("The worst film I have seen this year.", 1),
           ("Beautiful photography and a clever script.", 0), ("Flat acting and a plot full of holes.", 1),
           ("It made me laugh and cry; see it.", 0), ("I walked out after half an hour.", 1),
           # deliberately mislabelled, so that the accuracy is not trivially 1 and its equality means something
           ("A joy from start to finish.", 1), ("Tedious and badly written.", 0)]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Australia", "Canberra"),
            ("Switzerland", "Bern"), ("Germany", "Berlin")]
CHOICES = ["positive", "negative"]

MC_YAML = """\
task: ps_sentiment
dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["positive", "negative"]
doc_to_target: label
metric_list:
  - metric: acc
"""

GEN_YAML = """\
task: ps_capitals
dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "The capital of {{{{country}}}} is"
doc_to_target: "{{{{capital}}}}."
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
"""


def write_task(folder: Path, name: str, yaml_text: str, rows: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml_text.format(data=data, cache=folder / "cache"))


def harness(url: str, model: str, task: str, include: Path) -> dict:
    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=model, tokenizer=str(ensure_default_model_dir()))
    assert lm.tokenized_requests and lm.tokenizer_backend == "huggingface"  # the defaults: token-id prompts
    return simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(include)),
                           log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp / "srv", auth=False) as s:
        with s.client() as c:
            assert upload(c, "senti", pack(native_soft_prompt("prompt_tuning", T=4, seed=11)),
                          {"labels": CHOICES, "task_type": "classify"}).status_code == 201
            r = c.post("/v1/tasks", json={"task_id": "plain", "kind": "hard", "template": "{input}"})
            assert r.status_code == 201
        yield s


def test_harness_multiple_choice_on_a_soft_prompt_equals_classify(server, module_tmp):
    folder = module_tmp / "tasks_mc"
    folder.mkdir()
    write_task(folder, "ps_sentiment", MC_YAML, [{"text": t, "label": y} for t, y in REVIEWS])
    t0 = time.perf_counter()
    out = harness(server.url, "senti", "ps_sentiment", folder)
    elapsed = time.perf_counter() - t0
    acc = out["results"]["ps_sentiment"]["acc,none"]
    with server.client() as c:
        inputs = [f"Review: {t}\nSentiment:" for t, _ in REVIEWS]
        classified = c.post("/v1/tasks/senti/classify", json={"input": inputs}).json()
    ours = sum(CHOICES.index(r["label"]) == y for r, (_, y) in zip(classified, REVIEWS)) / len(REVIEWS)
    print(f"harness acc {acc:.3f} (classify: {ours:.3f}) on {len(REVIEWS)} docs in {elapsed:.1f} s")
    assert acc == pytest.approx(ours) and 0 < acc < 1
    # per document: the harness's log-likelihoods, normalised over the choices, are classify's scores
    samples = sorted(out["samples"]["ps_sentiment"], key=lambda s: s["doc_id"])
    assert len(samples) == len(REVIEWS)
    for sample, result in zip(samples, classified):
        lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in sample["resps"]]
        top = max(lls)
        probs = [math.exp(v - top) for v in lls]
        assert [p / sum(probs) for p in probs] == pytest.approx([result["scores"][c] for c in CHOICES], abs=1e-4)


def test_harness_generate_until_equals_generate(server, module_tmp):
    folder = module_tmp / "tasks_gen"
    folder.mkdir()
    write_task(folder, "ps_capitals", GEN_YAML, [{"country": c, "capital": k} for c, k in CAPITALS])
    out = harness(server.url, "plain", "ps_capitals", folder)
    em = out["results"]["ps_capitals"]["exact_match,strip"]
    samples = sorted(out["samples"]["ps_capitals"], key=lambda s: s["doc_id"])
    with server.client() as c:
        ours = [c.post("/v1/tasks/plain/generate", json={"input": f"The capital of {country} is",
                                                         "max_new_tokens": 8, "stop": ["\n"]}).json()["text"]
                for country, _ in CAPITALS]
    assert [s["resps"][0][0] for s in samples] == ours
    expected = sum(text.strip() == f"{capital}." for text, (_, capital) in zip(ours, CAPITALS)) / len(CAPITALS)
    print(f"harness exact_match {em:.3f} (generate: {expected:.3f})")
    assert em == pytest.approx(expected) and 0 < em < 1
