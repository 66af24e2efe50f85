"""Token-id inputs, echo and log-probabilities: what the engine returns equals PEFT's forward log-softmax, does not
depend on the batch, and agrees with the classify scores."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

from prompt_core.fingerprint import fingerprint
from prompt_core.layout import plan_row
from prompt_core.spec import PromptKind, PromptSpec, make_labels
from prompt_store.peft_io import import_peft
from server.engine.request import EngineRequest, InvalidRequest, PromptRef, SamplingParams
from tests.helpers import default_model, greedy, new_engine, prompt_ref, random_prompt, run, tiny_llama

ATOL = 1e-4
TOP = 3


def ids_of(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- layout of token-id inputs

def test_token_ids_go_where_the_input_goes_with_the_template_text_around_them():
    loaded = tiny_llama()
    spec = PromptSpec(PromptKind.P_TUNING, 5, "<v:3>Question:\n{input}\nAnswer:<v:2>")
    ids = ids_of(loaded, "What is 2+2?")
    plan = plan_row(spec, loaded.tokenizer, "", input_ids=ids)
    before, after = ids_of(loaded, "Question:\n"), ids_of(loaded, "\nAnswer:")
    assert plan.ids == [0] * 3 + before + ids + after + [0] * 2
    assert plan.virt == [0, 1, 2] + [-1] * (len(before) + len(ids) + len(after)) + [3, 4]
    assert plan.input_span == (3 + len(before), 3 + len(before) + len(ids))
    # the same text as a string gives the same row here (the seams are newlines), and echo keeps it apart too
    assert plan_row(spec, loaded.tokenizer, "What is 2+2?").ids == plan.ids
    assert plan_row(spec, loaded.tokenizer, "What is 2+2?", separate_input=True).input_span == plan.input_span


def test_ids_are_taken_as_given_even_where_text_would_merge_with_the_template():
    """"Q: {input}" with text merges the space into the input's first word; ids stay exactly as sent."""
    loaded = tiny_llama()
    spec = PromptSpec(PromptKind.HARD, 0, "Q: {input}")
    ids = ids_of(loaded, "Paris")
    plan = plan_row(spec, loaded.tokenizer, "", input_ids=ids)
    assert plan.ids == ids_of(loaded, "Q: ") + ids
    assert plan_row(spec, loaded.tokenizer, "Paris").ids == ids_of(loaded, "Q: Paris") != plan.ids


class BosTokenizer:
    """The default tokenizer with a BOS in front of every text, as Llama's tokenizers do."""

    def __init__(self, inner, bos: int):
        self.inner, self.bos = inner, bos

    def __call__(self, text, add_special_tokens=True):
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.bos] if add_special_tokens else []) + ids}


def test_leading_special_tokens_are_added_once():
    loaded = tiny_llama()
    tok = BosTokenizer(loaded.tokenizer, 1)
    ids = ids_of(loaded, "hello world")
    hard = PromptSpec(PromptKind.HARD, 0, "{input}")
    assert plan_row(hard, tok, "", input_ids=ids).ids == [1] + ids
    assert plan_row(hard, tok, "", input_ids=[1] + ids).ids == [1] + ids          # already there: not doubled
    assert plan_row(hard, tok, "", input_ids=[1] + ids).input_span == (0, len(ids) + 1)
    framed = PromptSpec(PromptKind.HARD, 0, "Q:\n{input}")
    assert plan_row(framed, tok, "", input_ids=ids).ids == [1] + ids_of(loaded, "Q:\n") + ids


# ---- PEFT's forward is the oracle

METHODS = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6,
                                                prompt_tuning_init="SAMPLE_VOCAB"),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5,
                                                prefix_projection=True, encoder_hidden_size=32),
    "p_tuning": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                            encoder_reparameterization_type="MLP", encoder_hidden_size=32),
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is 2 + 2?", "Hello"]


def oracle_logprobs(model, ids: list[int]) -> list[torch.Tensor | None]:
    """log_softmax predicting each of `ids` from one unbatched forward; None where nothing predicts it. PEFT's
    prompt-learning logits cover the virtual tokens too (prompt and P-tuning) or only the inputs (prefix)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]                   # [T + n or n, V]
    lead = logits.shape[0] - len(ids)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [logp[lead + p - 1] if lead + p - 1 >= 0 else None for p in range(len(ids))]


def check_entry(entry, token: int, ref: torch.Tensor | None, where: str):
    assert entry.token == token, where
    if ref is None:
        assert entry.logprob is None and entry.top == (), where
        return
    assert abs(entry.logprob - ref[token].item()) < ATOL, f"{where}: {entry.logprob} vs {ref[token].item()}"
    values, indices = ref.topk(TOP)
    assert [t for t, _ in entry.top] == indices.tolist(), where
    assert max(abs(a - b) for (_, a), b in zip(entry.top, values.tolist())) < ATOL, where


@pytest.mark.parametrize("method", ["hard", *METHODS])
def test_echo_and_logprobs_equal_peft_forward(method, tmp_path):
    """Every input token's log-probability (context: the virtual tokens or prefix, then the earlier input) and
    every generated token's, top-N included, equal PEFT's forward log-softmax in fp32 while the engine batches
    inputs of different lengths; a token-id input and its text give the same numbers."""
    loaded = tiny_llama()
    torch.manual_seed(3)
    if method == "hard":
        oracle, ref = loaded.model, PromptRef("hard@1", PromptSpec(PromptKind.HARD, 0, "{input}"))
    else:
        oracle = get_peft_model(loaded.model, METHODS[method]()).eval()
        oracle.save_pretrained(tmp_path)
        spec, tensors, _ = import_peft(tmp_path, fingerprint(loaded.model))
        ref = PromptRef(f"{method}@1", spec, lambda: tensors)
    try:
        requests = []
        for i, text in enumerate(TEXTS):
            requests.append(EngineRequest(f"s{i}", ref, "", mode="score", input_ids=tuple(ids_of(loaded, text)),
                                          echo=True, logprobs=TOP))
            requests.append(EngineRequest(f"g{i}", ref, text, sampling=greedy(4), echo=True, logprobs=TOP))
        engine = new_engine(loaded)
        outs = run(engine, requests)
        for i, text in enumerate(TEXTS):
            ids = ids_of(loaded, text)
            score, gen = outs[f"s{i}"], outs[f"g{i}"]
            assert score.finish_reason == "length" and score.completion_tokens == 0 and score.logprobs == []
            assert [e.token for e in score.prompt_logprobs] == ids
            generated = [e.token for e in gen.logprobs]
            assert len(generated) == 4 and gen.completion_tokens == 4
            refs = oracle_logprobs(oracle, ids + generated)
            for p, tok in enumerate(ids):
                check_entry(score.prompt_logprobs[p], tok, refs[p], f"{method} s{i} prompt {p}")
                check_entry(gen.prompt_logprobs[p], tok, refs[p], f"{method} g{i} prompt {p}")
            for k, tok in enumerate(generated):
                check_entry(gen.logprobs[k], tok, refs[len(ids) + k], f"{method} g{i} output {k}")
            # the first input token has a context exactly when virtual tokens precede it
            assert (score.prompt_logprobs[0].logprob is None) == (method in ("hard", "prefix_tuning"))
    finally:
        if method != "hard":
            oracle.unload() if hasattr(oracle, "unload") else None
            loaded.model.__dict__.pop("peft_config", None)


# ---- batched equals alone

def logprob_requests(loaded) -> list[EngineRequest]:
    """Echo, logprobs and score requests on all four kinds, mixed with plain generate and classify."""
    labels = make_labels(["positive", "negative"])
    tasks = {
        "hard": (PromptSpec(PromptKind.HARD, 0, "Question:\n{input}\nAnswer:", labels), None),
        "pt": (PromptSpec(PromptKind.PROMPT_TUNING, 5, "Review:\n{input}", labels),
               random_prompt(loaded, PromptKind.PROMPT_TUNING, 5, 1)),
        "pt_bare": (PromptSpec(PromptKind.PROMPT_TUNING, 4, "{input}"),
                    random_prompt(loaded, PromptKind.PROMPT_TUNING, 4, 5)),
        "ptune": (PromptSpec(PromptKind.P_TUNING, 6, "<v:4>Review:\n{input}<v:2>\nSentiment:", labels),
                  random_prompt(loaded, PromptKind.P_TUNING, 6, 2)),
        "prefix": (PromptSpec(PromptKind.PREFIX_TUNING, 7, "{input}", labels),
                   random_prompt(loaded, PromptKind.PREFIX_TUNING, 7, 3)),
    }
    refs = {k: prompt_ref(f"{k}@1", spec, t) for k, (spec, t) in tasks.items()}
    texts = ["Hi", "The film was long but the ending made up for every slow minute of it.",
             "What is the capital of France?", "Terrible."]
    reqs = []
    for i, (task, t, kind) in enumerate([("hard", 1, "echo"), ("pt", 0, "score"), ("pt_bare", 2, "echo"),
                                         ("ptune", 3, "logprobs"), ("prefix", 1, "score"), ("pt_bare", 1, "score"),
                                         ("hard", 2, "plain"), ("pt", 3, "classify"), ("ptune", 2, "echo"),
                                         ("prefix", 0, "logprobs")]):
        ids = tuple(ids_of(loaded, texts[t]))
        if kind == "score":
            reqs.append(EngineRequest(f"r{i}", refs[task], "", mode="score", input_ids=ids, echo=True, logprobs=2))
        elif kind == "echo":
            reqs.append(EngineRequest(f"r{i}", refs[task], texts[t], sampling=greedy(5), echo=True, logprobs=TOP))
        elif kind == "logprobs":
            reqs.append(EngineRequest(f"r{i}", refs[task], texts[t], sampling=greedy(5), logprobs=1))
        elif kind == "classify":
            reqs.append(EngineRequest(f"r{i}", refs[task], texts[t], mode="classify"))
        else:
            reqs.append(EngineRequest(f"r{i}", refs[task], texts[t], sampling=greedy(5)))
    return reqs


def same_entries(a, b, where):
    assert (a is None) == (b is None), where
    if a is None:
        return
    assert [e.token for e in a] == [e.token for e in b], where
    for k, (x, y) in enumerate(zip(a, b)):
        assert (x.logprob is None) == (y.logprob is None), f"{where} {k}"
        if x.logprob is not None:
            assert abs(x.logprob - y.logprob) < ATOL, f"{where} {k}: {x.logprob} vs {y.logprob}"
        assert [t for t, _ in x.top] == [t for t, _ in y.top], f"{where} {k}"


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_logprobs_batched_equal_alone(which):
    loaded = tiny_llama() if which == "tiny" else default_model()
    requests = logprob_requests(loaded)
    together = run(new_engine(loaded), requests[:6], join_after={1: requests[6:]})  # some join mid-decode
    assert set(together) == {r.request_id for r in requests}
    for req in requests:
        alone = run(new_engine(loaded, prefix_caching=False), [req])[req.request_id]
        got = together[req.request_id]
        assert got.error is None and got.text == alone.text, req.request_id
        same_entries(got.prompt_logprobs, alone.prompt_logprobs, f"{req.request_id} prompt")
        same_entries(got.logprobs, alone.logprobs, f"{req.request_id} output")
        if req.echo and req.logprobs is not None:
            sent = req.input_ids if req.input_ids is not None else ids_of(loaded, req.text)
            assert [e.token for e in got.prompt_logprobs] == list(sent), req.request_id
        if req.logprobs is not None and req.mode == "generate":
            assert len(got.logprobs) >= got.completion_tokens >= 1


def test_echo_after_a_cached_head_still_scores_the_first_input_token():
    """A prompt-tuning task with template {input}: its cached head is one block of 16 virtual tokens, whose last
    query predicts the input's first token. An echo request recomputes that query rather than lose the number;
    a plain request of the task takes the block from the cache."""
    loaded = tiny_llama()
    spec = PromptSpec(PromptKind.PROMPT_TUNING, 16, "{input}")
    ref = prompt_ref("bare@1", spec, random_prompt(loaded, PromptKind.PROMPT_TUNING, 16, 7))
    ids = tuple(ids_of(loaded, "one two three"))
    engine = new_engine(loaded)
    run(engine, [EngineRequest("warm", ref, "four five", sampling=greedy(2))])  # caches the 16-token head
    run(engine, [EngineRequest("again", ref, "six seven", sampling=greedy(2))])
    assert engine.kv_stats()["prefix_hits"] == 16
    out = run(engine, [EngineRequest("e", ref, "", mode="score", input_ids=ids, echo=True, logprobs=1)])["e"]
    assert engine.kv_stats()["prefix_hits"] == 16     # the echo request computed the head's last query itself
    plain = run(new_engine(loaded, prefix_caching=False),
                [EngineRequest("e", ref, "", mode="score", input_ids=ids, echo=True, logprobs=1)])["e"]
    assert out.prompt_logprobs[0].logprob is not None
    same_entries(out.prompt_logprobs, plain.prompt_logprobs, "cached head")


def test_a_final_eos_is_listed_in_the_logprobs():
    """Clients that score with max_tokens 1 drop the last entry as the generated token: a generated EOS (which is
    not in the text) must still have its entry."""
    loaded = tiny_llama()
    ref = prompt_ref("hard@1", PromptSpec(PromptKind.HARD, 0, "{input}"), None)
    engine = new_engine(loaded)
    eos = next(iter(engine.eos_ids))
    with torch.no_grad():  # make EOS the model's favourite token everywhere, for this test only
        engine.runner.model.lm_head.bias = torch.nn.Parameter(torch.zeros(loaded.model.config.vocab_size))
        engine.runner.model.lm_head.bias[eos] = 100.0
    try:
        out = run(engine, [EngineRequest("x", ref, "hello", sampling=greedy(3), echo=True, logprobs=1)])["x"]
    finally:
        engine.runner.model.lm_head.bias = None
    assert out.finish_reason == "stop" and out.completion_tokens == 0 and out.text == ""
    assert [e.token for e in out.logprobs] == [eos]
    assert len(out.prompt_logprobs) == len(ids_of(loaded, "hello"))


# ---- agreement with classify

@pytest.mark.parametrize("task", ["hard", "pt", "prefix"])
def test_verbalizer_logprobs_sum_to_the_classify_score(task):
    """For a task whose template ends with its input, the log-probabilities of a verbalizer's tokens after the
    input, read with echo, sum to that label's classify score before normalisation."""
    loaded = tiny_llama()
    labels = make_labels({"positive": " positive", "negative": " negative", "mixed": " mixed feelings"})
    spec, tensors = {
        "hard": (PromptSpec(PromptKind.HARD, 0, "Review:\n{input}", labels), None),
        "pt": (PromptSpec(PromptKind.PROMPT_TUNING, 5, "{input}", labels),
               random_prompt(loaded, PromptKind.PROMPT_TUNING, 5, 1)),
        "prefix": (PromptSpec(PromptKind.PREFIX_TUNING, 4, "Review:\n{input}", labels),
                   random_prompt(loaded, PromptKind.PREFIX_TUNING, 4, 2)),
    }[task]
    ref = prompt_ref(f"{task}@1", spec, tensors)
    text = "I loved the soundtrack but the plot was thin."
    engine = new_engine(loaded)
    seq = engine.add_request(EngineRequest("c", ref, text, mode="classify"))
    verbal = [ids_of(loaded, lab.verbalizer) for lab in labels]
    requests = [EngineRequest(f"e{k}", ref, "", mode="score", input_ids=tuple(ids_of(loaded, text) + v), echo=True,
                              logprobs=0) for k, v in enumerate(verbal)]
    outs = run(engine, requests)  # scored in the same batch as the classify request
    assert seq.label_scores is not None and len(seq.label_scores) == 3
    for k, v in enumerate(verbal):
        tail = outs[f"e{k}"].prompt_logprobs[-len(v):]
        assert [e.token for e in tail] == v
        total = sum(e.logprob for e in tail)
        assert abs(total - seq.label_scores[k]) < ATOL, (labels[k].name, total, seq.label_scores[k])


# ---- refused

def test_bad_logprob_requests_are_refused():
    loaded = tiny_llama()
    ref = prompt_ref("hard@1", PromptSpec(PromptKind.HARD, 0, "{input}", make_labels(["a", "b"])), None)
    engine = new_engine(loaded, max_logprobs=5)
    bad = [(dict(logprobs=6), "between 0 and 5"), (dict(mode="score"), "needs echo"),
           (dict(mode="classify", echo=True, logprobs=1), "classify"),
           (dict(input_ids=(loaded.model.config.vocab_size,)), "outside the model's vocabulary"),
           (dict(input_ids=()), "at least one token")]
    for fields, message in bad:
        with pytest.raises(InvalidRequest, match=message):
            engine.add_request(EngineRequest("x", ref, "hi", **fields))
    assert not engine.has_work()
    big = new_engine(loaded, max_input_tokens=8)
    with pytest.raises(InvalidRequest, match="limit is 8"):
        big.add_request(EngineRequest("x", ref, "", input_ids=tuple(range(100, 120)), sampling=SamplingParams()))


# ---- the model's own output path

@pytest.mark.parametrize("name", ["gemma2-window-softcap", "cohere-logit-scale", "falcon-multi-query"])
def test_logprobs_follow_the_models_own_output_path(name):
    """Final-logit softcapping, logit scales, sliding windows shorter than the input, multi-query caches: echo and
    sampled-token log-probabilities equal the log-softmax of the model's own forward on the request alone."""
    from tests.server.engine.test_architectures import build

    loaded = build(name)
    ref = PromptRef("hard@1", PromptSpec(PromptKind.HARD, 0, "{input}"))
    texts = ["The quick brown fox jumps over the lazy dog again and again.", "What is 2 + 2?"]
    requests = [EngineRequest(f"g{i}", ref, "", input_ids=tuple(ids_of(loaded, t)), sampling=greedy(3), echo=True,
                              logprobs=TOP) for i, t in enumerate(texts)]
    outs = run(new_engine(loaded), requests)
    for i, text in enumerate(texts):
        out, ids = outs[f"g{i}"], ids_of(loaded, text)
        generated = [e.token for e in out.logprobs]
        refs = oracle_logprobs(loaded.model, ids + generated)
        for p, tok in enumerate(ids):
            check_entry(out.prompt_logprobs[p], tok, refs[p], f"{name} g{i} prompt {p}")
        for k, tok in enumerate(generated):
            check_entry(out.logprobs[k], tok, refs[len(ids) + k], f"{name} g{i} output {k}")
