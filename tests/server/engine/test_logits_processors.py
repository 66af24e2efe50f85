"""Per-row output control in the batched step: grammar constraints, logit_bias, presence/frequency penalties.

Constrained rows of different grammars share a batch with unconstrained rows of other tasks; every constrained
output must parse and validate, and every unconstrained row must be exactly what it is alone.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from prompt_core.spec import PromptKind, PromptSpec
from server.engine import constraints as C
from server.engine.logits_processors import LogitsProcessor
from server.engine.request import EngineRequest, InvalidRequest, SamplingParams, Sequence, Status
from tests.helpers import default_model, greedy, new_engine, prompt_ref, random_prompt, run
from tests.server.engine.test_batching import check_same

CHAT = PromptSpec(PromptKind.HARD, 0, "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]},
                                         "capital": {"type": "boolean"}},
        "required": ["city", "capital"], "additionalProperties": False}
DATE = r"\d{4}-\d{2}-\d{2}"


def constrained(loaded):
    """Constrained requests (id -> request, validator) of different kinds on the chat-template task."""
    ref = prompt_ref("chat@1", CHAT, None)

    def req(rid, text, constraint, n=40):
        return EngineRequest(rid, ref, text, sampling=SamplingParams(max_new_tokens=n, constraint=constraint))

    return {
        "person": (req("person", "Give me a JSON object for a person called Ada aged 36.", C.json_schema(PERSON)),
                   lambda t: jsonschema.validate(json.loads(t), PERSON)),
        "city": (req("city", "Name a European capital as JSON.", C.json_schema(CITY)),
                 lambda t: jsonschema.validate(json.loads(t), CITY)),
        "object": (req("object", "Describe a cat.", C.Constraint("json_object"), n=64),
                   lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
        "date": (req("date", "When did the Berlin wall fall?", C.regex(DATE), n=20),
                 lambda t: re.fullmatch(DATE, t) or pytest.fail(t)),
        "choice": (req("choice", "Is Paris in France? Answer yes or no.", C.choice(["yes", "no", "maybe not"]), n=8),
                   lambda t: t in ("yes", "no", "maybe not") or pytest.fail(t)),
    }


def unconstrained(loaded):
    tasks = {
        "pt": (PromptSpec(PromptKind.PROMPT_TUNING, 5, "Review: {input}\nSentiment:"),
               random_prompt(loaded, PromptKind.PROMPT_TUNING, 5, 1)),
        "prefix": (PromptSpec(PromptKind.PREFIX_TUNING, 3, "Q: {input} A:"),
                   random_prompt(loaded, PromptKind.PREFIX_TUNING, 3, 4)),
        "chat": (CHAT, None),
    }
    refs = {k: prompt_ref(f"{k}@1", spec, t) for k, (spec, t) in tasks.items()}
    return [EngineRequest("free-pt", refs["pt"], "The film was long but worth it.", sampling=greedy(8)),
            EngineRequest("free-prefix", refs["prefix"], "What is the capital of France?", sampling=greedy(8)),
            EngineRequest("free-chat", refs["chat"], "Describe a cat.", sampling=greedy(8))]


@pytest.mark.slow
def test_mixed_batch_of_grammars_validates_and_leaves_free_rows_alone():
    loaded = default_model()
    cons = constrained(loaded)
    free = unconstrained(loaded)
    requests = [r for r, _ in cons.values()] + free
    requests = requests[::2] + requests[1::2]  # interleave constrained and free rows
    engine = new_engine(loaded)
    outs = run(engine, requests)
    assert all(o.error is None for o in outs.values())
    for rid, (req, validate) in cons.items():
        out = outs[rid]
        assert out.finish_reason == "stop", (rid, out.text)  # the grammar completed and EOS was then allowed
        validate(out.text)
        alone = run(new_engine(loaded), [req])[rid]
        assert alone.text == out.text, rid
    # unconstrained rows: same text and same logits at every step as alone
    check_same(loaded, engine, outs, free)
    assert engine.grammars.compiles == len(cons)


@pytest.mark.slow
def test_constraint_changes_the_text_it_constrains():
    """The same request without its constraint answers in free text (a Markdown fence), so the JSON is the mask's."""
    loaded = default_model()
    ref = prompt_ref("chat@1", CHAT, None)
    text = "Describe a cat as JSON."
    free = run(new_engine(loaded), [EngineRequest("f", ref, text, sampling=greedy(12))])["f"]
    with pytest.raises(ValueError):
        json.loads(free.text)
    sp = SamplingParams(max_new_tokens=64, constraint=C.Constraint("json_object"))
    out = run(new_engine(loaded), [EngineRequest("c", ref, text, sampling=sp)])["c"]
    assert isinstance(json.loads(out.text), dict)


@pytest.mark.slow
def test_max_tokens_inside_an_unfinished_structure_is_length():
    loaded = default_model()
    ref = prompt_ref("chat@1", CHAT, None)
    sp = SamplingParams(max_new_tokens=5, constraint=C.json_schema(PERSON))
    out = run(new_engine(loaded), [EngineRequest("r", ref, "A person as JSON.", sampling=sp)])["r"]
    assert out.finish_reason == "length"
    assert out.completion_tokens == 5
    assert out.text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(out.text)


@pytest.mark.slow
def test_sampled_constrained_rows_validate_and_reproduce_with_a_seed():
    loaded = default_model()
    ref = prompt_ref("chat@1", CHAT, None)
    sp = SamplingParams(max_new_tokens=40, temperature=1.0, seed=11, constraint=C.json_schema(CITY))
    reqs = [EngineRequest(f"s{i}", ref, "Name a European capital as JSON.", sampling=sp) for i in range(3)]
    outs = run(new_engine(loaded), reqs)
    texts = {o.text for o in outs.values()}
    assert len(texts) == 1  # the same seed, the same draws, whatever the batch
    for o in outs.values():
        jsonschema.validate(json.loads(o.text), CITY)


# ---- logit_bias and penalties

def _seq(output_ids, **sampling):
    seq = Sequence(request=EngineRequest("x", prompt_ref("t@1", CHAT, None), "", sampling=SamplingParams(**sampling)),
                   plan=None)
    seq.output_ids = list(output_ids)
    return seq


def test_penalties_follow_openai_formula_per_row():
    """logit -= count * frequency_penalty + (count > 0) * presence_penalty, over the tokens generated so far."""
    V = 12
    proc = LogitsProcessor(V)
    logits = torch.randn(3, V)
    seqs = [_seq([5, 5, 7], frequency_penalty=0.5, presence_penalty=0.25), _seq([5, 5, 7]),
            _seq([1, 1, 1, 9], frequency_penalty=-1.0, presence_penalty=2.0)]
    got = proc.apply(logits, seqs)
    want = logits.clone()
    want[0, 5] -= 2 * 0.5 + 0.25
    want[0, 7] -= 0.5 + 0.25
    want[2, 1] -= 3 * -1.0 + 2.0
    want[2, 9] -= -1.0 + 2.0
    assert torch.allclose(got, want)
    assert not torch.equal(got, logits)  # a processed copy: the model's logits are untouched


def test_rows_without_processing_are_not_copied():
    logits = torch.randn(2, 12)
    assert LogitsProcessor(12).apply(logits, [_seq([1, 2]), _seq([])]) is logits


def test_logit_bias_adds_per_row():
    V = 12
    logits = torch.zeros(2, V)
    got = LogitsProcessor(V).apply(logits, [_seq([], logit_bias=((3, 100.0), (4, -100.0))), _seq([])])
    assert got[0, 3] == 100 and got[0, 4] == -100 and got[0].abs().sum() == 200
    assert torch.equal(got[1], logits[1])


@pytest.mark.slow
def test_logit_bias_forces_and_forbids_tokens_in_a_batch():
    loaded = default_model()
    ref = prompt_ref("chat@1", CHAT, None)
    tok = loaded.tokenizer
    text = "What is the capital of France?"
    plain = run(new_engine(loaded), [EngineRequest("p", ref, text, sampling=greedy(6))])["p"]
    first = tok(plain.text, add_special_tokens=False)["input_ids"][0]
    forced = tok(" banana", add_special_tokens=False)["input_ids"][0]
    reqs = [EngineRequest("plus", ref, text, sampling=SamplingParams(max_new_tokens=4, logit_bias=((forced, 100.0),))),
            EngineRequest("minus", ref, text, sampling=SamplingParams(max_new_tokens=6, logit_bias=((first, -100.0),))),
            EngineRequest("p", ref, text, sampling=greedy(6))]
    engine = new_engine(loaded)
    outs = run(engine, reqs)
    assert tok(outs["plus"].text, add_special_tokens=False)["input_ids"] == [forced] * 4
    assert first not in tok(outs["minus"].text, add_special_tokens=False)["input_ids"]
    assert outs["minus"].text != plain.text
    assert outs["p"].text == plain.text  # its neighbours' biases do not reach it


def test_logit_bias_beyond_the_vocabulary_is_refused():
    loaded = default_model()
    engine = new_engine(loaded)
    ref = prompt_ref("chat@1", CHAT, None)
    with pytest.raises(InvalidRequest, match="beyond the vocabulary"):
        engine.make_sequence(EngineRequest("r", ref, "x", sampling=SamplingParams(logit_bias=((10**7, 1.0),))))
    with pytest.raises(InvalidRequest, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias=((1, 101.0),))
    with pytest.raises(InvalidRequest, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    # the grammar decides where a constrained output ends: holding EOS back could leave a row no token to take
    for end in ({"min_tokens": 3}, {"ignore_eos": True}):
        with pytest.raises(InvalidRequest, match="cannot be combined with an output constraint"):
            SamplingParams(constraint=C.choice(["yes"]), **end)


@pytest.mark.slow
def test_penalties_reduce_repetition():
    """Greedy continuation of a list repeats one word; a frequency penalty stops that, and a presence penalty
    spreads the text over more distinct tokens."""
    loaded = default_model()
    ref = prompt_ref("raw@1", PromptSpec(PromptKind.HARD, 0, "{input}"), None)
    text = "A list of fruits: apple, apple, apple, apple,"
    tok = loaded.tokenizer

    def ids(sp):
        out = run(new_engine(loaded), [EngineRequest("r", ref, text, sampling=sp)])["r"]
        return tok(out.text, add_special_tokens=False)["input_ids"]

    def most_repeated(x):
        return max(x.count(i) for i in set(x))

    base = ids(greedy(30))
    freq = ids(SamplingParams(max_new_tokens=30, frequency_penalty=1.5))
    pres = ids(SamplingParams(max_new_tokens=30, presence_penalty=2.0))
    assert most_repeated(base) >= 12 and len(set(base)) <= 3  # the prompt does make the model repeat
    assert most_repeated(freq) < most_repeated(base) / 2
    assert len(set(pres)) > 2 * len(set(base))


# ---- n choices of one prompt

@pytest.mark.slow
def test_choices_of_one_prompt_share_its_prefill(monkeypatch):
    """n choices of one prompt: its full blocks are computed once, by the first choice, and the others take them
    from the prefix cache one step later; each choice is the same as that choice alone."""
    from server.engine import model_runner

    loaded = default_model()
    specs = {"pt": (PromptSpec(PromptKind.PROMPT_TUNING, 5, "Review: {input}\nSentiment:"),
                    random_prompt(loaded, PromptKind.PROMPT_TUNING, 5, 1)),
             "prefix": (PromptSpec(PromptKind.PREFIX_TUNING, 3, "Q: {input} A:"),
                        random_prompt(loaded, PromptKind.PREFIX_TUNING, 3, 4))}
    text = ("The film was long, but the ending made up for every slow minute of it, and the music was superb. "
            "I would see it again with friends, and I think most people who like slow films would enjoy it too.")
    queries = []  # prompt queries computed (decode steps not counted)
    real_run = model_runner.ModelRunner.run

    def counting(self, batch):
        queries.append(sum(min(x.count, x.seq.plan.num_tokens - x.start) for x in batch
                           if x.start < x.seq.plan.num_tokens))
        return real_run(self, batch)

    monkeypatch.setattr(model_runner.ModelRunner, "run", counting)
    for key, (spec, tensors) in specs.items():
        ref = prompt_ref(f"{key}@1", spec, tensors)

        def reqs(share):
            return [EngineRequest(f"c{j}", ref, text, share_prompt=share,
                                  sampling=SamplingParams(max_new_tokens=5, temperature=1.0, seed=3 + j))
                    for j in range(3)]

        queries.clear()
        engine = new_engine(loaded)
        shared = run(engine, reqs(True))
        prefill_shared = sum(queries)
        queries.clear()
        separate = {}
        for r in reqs(False):
            separate.update(run(new_engine(loaded), [r]))
        prefill_separate = sum(queries)
        assert {k: o.text for k, o in shared.items()} == {k: o.text for k, o in separate.items()}, key
        # all but the last partial block of the prompt is computed once
        assert prefill_shared <= prefill_separate / 3 + 2 * 16, (key, prefill_shared, prefill_separate)
        assert engine.kv_stats()["used_blocks"] == 0


@pytest.mark.slow
def test_a_preempted_constrained_request_resumes_with_its_grammar():
    """Preemption frees the row, not the grammar: the resumed request continues its JSON from where it was and
    gives exactly the text it gives alone (with penalties, which count its earlier output, too)."""
    loaded = default_model()
    ref = prompt_ref("chat@1", CHAT, None)
    heavy = [EngineRequest(f"h{i}", ref, "Give me a JSON object for a person called Ada aged 36.", tenant="heavy",
                           sampling=SamplingParams(max_new_tokens=30, constraint=C.json_schema(PERSON),
                                                   frequency_penalty=0.5 * i))
             for i in range(2)]
    light = EngineRequest("l0", ref, "Hi", tenant="light", sampling=greedy(3))
    engine = new_engine(loaded, max_batch_size=2)
    seqs = [engine.add_request(r) for r in heavy]
    for _ in range(4):
        engine.step()
    finals = {}
    engine.add_request(light)
    for out in engine.step():
        finals[out.request_id] = out
    assert seqs[1].status is Status.WAITING and seqs[1].output_ids and seqs[1].matcher is not None  # mid-JSON
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    for req in heavy:
        alone = run(new_engine(loaded), [req])[req.request_id]
        assert finals[req.request_id].text == alone.text, req.request_id
        jsonschema.validate(json.loads(finals[req.request_id].text), PERSON)
