"""Engine behaviour around the batch: limits, sampling per request, stop strings, cancellation, failure isolation."""

from __future__ import annotations

import pytest

from prompt_core.spec import PromptKind, PromptSpec, make_labels
from server.engine.request import EngineRequest, InputTooLong, InvalidRequest, SamplingParams, Status
from tests.helpers import greedy, new_engine, prompt_ref, random_prompt, run, tiny_llama

HARD = prompt_ref("hard@1", PromptSpec(PromptKind.HARD, 0, "Say: {input}"), None)


@pytest.fixture(scope="module")
def loaded():
    return tiny_llama()


@pytest.mark.parametrize("kind", [PromptKind.PROMPT_TUNING, PromptKind.P_TUNING, PromptKind.PREFIX_TUNING])
def test_every_kinds_virtual_tokens_count_toward_limits_and_usage(loaded, kind):
    """T virtual tokens count the same whether they are input embeddings or prefix key/values: an input that fits
    beside them passes, one token more is refused, and usage reports them."""
    T = 6
    ref = prompt_ref(f"{kind}@1", PromptSpec(kind, T, "{input}"), random_prompt(loaded, kind, T, 0))
    text_tokens = len(loaded.tokenizer("word " * 9, add_special_tokens=False)["input_ids"])
    engine = new_engine(loaded, max_input_tokens=T + text_tokens)
    out = run(engine, [EngineRequest("fits", ref, "word " * 9, sampling=greedy(2))])["fits"]
    assert out.prompt_tokens == T + text_tokens
    with pytest.raises(InputTooLong, match=f"has {T + text_tokens} tokens .*limit is {T + text_tokens - 1}"):
        new_engine(loaded, max_input_tokens=T + text_tokens - 1).add_request(
            EngineRequest("long", ref, "word " * 9, sampling=greedy(2)))


def test_limits_give_clear_errors(loaded):
    engine = new_engine(loaded, max_input_tokens=16, max_new_tokens=8)
    with pytest.raises(InputTooLong, match="limit is 16"):
        engine.add_request(EngineRequest("a", HARD, "word " * 40, sampling=greedy(3)))
    with pytest.raises(InputTooLong, match="at most 8"):
        engine.add_request(EngineRequest("b", HARD, "hi", sampling=SamplingParams(max_new_tokens=9)))
    with pytest.raises(InputTooLong, match="the model has 512"):  # the tiny model's max positions
        new_engine(loaded, max_new_tokens=600).add_request(
            EngineRequest("p", HARD, "hi", sampling=SamplingParams(max_new_tokens=600)))
    with pytest.raises(InvalidRequest, match="no labels"):
        engine.add_request(EngineRequest("c", HARD, "hi", mode="classify"))
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                dict(top_p=0.0), dict(top_k=-1), dict(stop=("",))):
        with pytest.raises(InvalidRequest):
            SamplingParams(**bad)
    assert not engine.has_work()  # nothing half-added
    outs = run(engine, [EngineRequest("ok", HARD, "hi", sampling=greedy(3))])
    assert outs["ok"].finish_reason in ("length", "stop")


def test_seeded_sampling_is_reproducible_and_batch_independent(loaded):
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=42)
    alone = run(new_engine(loaded), [EngineRequest("s", HARD, "hello", sampling=sampling)])["s"]
    crowd = [EngineRequest(f"o{i}", HARD, f"other text {i}", sampling=SamplingParams(max_new_tokens=8,
             temperature=1.0, seed=i)) for i in range(4)]
    together = run(new_engine(loaded), crowd + [EngineRequest("s", HARD, "hello", sampling=sampling)])["s"]
    assert together.text == alone.text and together.completion_tokens == alone.completion_tokens
    other_seed = run(new_engine(loaded), [EngineRequest("s", HARD, "hello", sampling=SamplingParams(
        max_new_tokens=8, temperature=1.0, top_p=0.9, seed=43))])["s"]
    assert other_seed.text != alone.text


def test_stop_strings_cut_the_text(loaded):
    full = run(new_engine(loaded), [EngineRequest("f", HARD, "hello", sampling=greedy(12))])["f"]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = run(new_engine(loaded), [EngineRequest("c", HARD, "hello", sampling=SamplingParams(
        max_new_tokens=12, stop=(stop,)))])["c"]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_streamed_deltas_add_up_to_the_text(loaded):
    engine = new_engine(loaded)
    engine.add_request(EngineRequest("d", HARD, "hello", sampling=greedy(10)))
    deltas, final = [], None
    while engine.has_work():
        for out in engine.step():
            deltas.append(out.new_text)
            final = out if out.finished else final
    assert "".join(deltas) == final.text and final.completion_tokens == 10


def scripted(engine, monkeypatch, tokens: list[int]) -> None:
    """The engine's one generating row produces `tokens`, in order, whatever the model says."""
    script = iter(tokens)
    real = engine.runner.run

    def run_scripted(batch, *rest):
        results = real(batch, *rest)
        for r in results:
            if r.token is not None:
                r.token = next(script)
        return results

    monkeypatch.setattr(engine.runner, "run", run_scripted)


@pytest.mark.parametrize("text, cut, expected", [
    ("🙂🙂", 3, "🙂"),             # the second emoji's first bytes, then max_new_tokens
    ("中文 日本語", 3, "中文 "),     # the space held back with the split character is still flushed
    ("中文 日本語", 5, "中文 日"),   # a character completed by the last token
])
def test_a_character_split_by_the_end_is_held_back_not_replaced(loaded, monkeypatch, text, cut, expected):
    """Streams never carry U+FFFD for a split character: deltas wait until it completes; one the end cuts is dropped."""
    engine = new_engine(loaded)
    tokens = engine.tokenizer.encode(text, add_special_tokens=False)
    scripted(engine, monkeypatch, tokens[:cut])
    engine.add_request(EngineRequest("u", HARD, "hello", sampling=greedy(cut)))
    deltas, final = [], None
    while engine.has_work():
        for out in engine.step():
            deltas.append(out.new_text)
            final = out if out.finished else final
    assert final.completion_tokens == cut and final.finish_reason == "length"
    assert final.text == expected and "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)


def test_cancel_frees_the_row_and_its_blocks(loaded):
    engine = new_engine(loaded, prefix_caching=False)
    seqs = [engine.add_request(EngineRequest(f"r{i}", HARD, f"hello {i}", sampling=greedy(50))) for i in range(3)]
    engine.step()
    assert engine.scheduler.num_running == 3
    held = engine.kv_stats()["used_blocks"]
    engine.abort(seqs[1])
    outs = {o.request_id: o for o in engine.step()}
    assert outs["r1"].finish_reason == "cancelled" and seqs[1].blocks.tables == [[]]
    assert engine.scheduler.num_running == 2 and engine.kv_stats()["used_blocks"] < held


def test_a_failing_prompt_fails_alone(loaded):
    def broken():
        raise OSError("prompt.safetensors: sha256 mismatch")

    bad = prompt_ref("bad@1", PromptSpec(PromptKind.PROMPT_TUNING, 4), None)
    bad = type(bad)(bad.key, bad.spec, broken)
    good_spec = PromptSpec(PromptKind.PREFIX_TUNING, 3, labels=make_labels(["yes", "no"]))
    good = prompt_ref("good@1", good_spec, random_prompt(loaded, PromptKind.PREFIX_TUNING, 3, 0))
    requests = [EngineRequest("g1", good, "is it?", sampling=greedy(4)), EngineRequest("b", bad, "hi"),
                EngineRequest("g2", good, "really", mode="classify")]
    engine = new_engine(loaded)
    outs = run(engine, requests)
    assert outs["b"].finish_reason == "error" and "sha256 mismatch" in outs["b"].error
    alone = run(new_engine(loaded), [requests[0], requests[2]])
    assert outs["g1"].text == alone["g1"].text and outs["g1"].error is None
    assert outs["g2"].label_probs == pytest.approx(alone["g2"].label_probs, abs=1e-5)


def test_an_exception_in_the_batched_forward_fails_only_its_request(loaded, monkeypatch):
    engine = new_engine(loaded)
    real = engine.runner.run

    def flaky(batch, *rest):  # injected fault: any step holding request "x" raises
        if any(item.seq.request_id == "x" for item in batch):
            raise RuntimeError("injected")
        return real(batch, *rest)

    monkeypatch.setattr(engine.runner, "run", flaky)
    requests = [EngineRequest(i, HARD, f"input {i}", sampling=greedy(4)) for i in ("a", "x", "b")]
    outs = run(engine, requests)
    assert outs["x"].finish_reason == "error"
    expected = run(new_engine(loaded), [requests[0], requests[2]])
    assert outs["a"].text == expected["a"].text and outs["b"].text == expected["b"].text
    assert engine.scheduler.num_running == 0 and engine.kv_stats()["used_blocks"] == 0


def test_a_preempted_request_resumes_with_the_same_text(loaded):
    """A light tenant takes a row from a flooding one at once; the preempted request, resumed by recomputing its
    prompt and output, still produces exactly the text it produces alone, sampled or greedy."""
    heavy = [EngineRequest(f"h{i}", HARD, f"heavy input {i}", tenant="heavy", sampling=greedy(12)) for i in range(3)]
    heavy.append(EngineRequest("h3", HARD, "heavy sampled", tenant="heavy",
                               sampling=SamplingParams(max_new_tokens=12, temperature=0.8, seed=5)))
    light = EngineRequest("l0", HARD, "light", tenant="light", sampling=greedy(3))
    engine = new_engine(loaded, max_batch_size=4)
    seqs = [engine.add_request(r) for r in heavy]
    for _ in range(4):
        engine.step()
    finals = {}
    engine.add_request(light)
    for out in engine.step():
        finals[out.request_id] = out
    assert seqs[3].status is Status.WAITING and seqs[3].output_ids  # preempted mid-decode, keeping its output
    assert "l0" in [s.request_id for s in engine.scheduler.running]  # the light request runs in its place
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    for req in heavy + [light]:
        alone = run(new_engine(loaded), [req])[req.request_id]
        assert finals[req.request_id].text == alone.text, req.request_id
        assert finals[req.request_id].completion_tokens == alone.completion_tokens


def _first_greedy_token(loaded, text: str):
    engine = new_engine(loaded)
    run(engine, [EngineRequest("probe", HARD, text, sampling=greedy(1))])
    logits = engine.runner.trace["probe"][0]
    return int(logits.argmax()), logits


def test_ignore_eos_keeps_generating_through_end_of_sequence(loaded):
    """Make the request's first greedy token an end-of-sequence token: it stops at once, unless it ignores EOS,
    and then it generates exactly the tokens it would without that EOS, to full length."""
    first, _ = _first_greedy_token(loaded, "hello there")
    plain = run(new_engine(loaded), [EngineRequest("p", HARD, "hello there", sampling=greedy(5))])["p"]
    engine = new_engine(loaded)
    engine.eos_ids = {first}
    stops = run(engine, [EngineRequest("s", HARD, "hello there", sampling=greedy(5))])["s"]
    assert (stops.finish_reason, stops.completion_tokens) == ("stop", 0)
    engine = new_engine(loaded)
    engine.eos_ids = {first}
    ignoring = run(engine, [EngineRequest("i", HARD, "hello there",
                                          sampling=SamplingParams(max_new_tokens=5, temperature=0.0,
                                                                  ignore_eos=True))])["i"]
    assert (ignoring.finish_reason, ignoring.completion_tokens) == ("length", 5)
    assert ignoring.text == plain.text


def test_min_tokens_holds_back_end_of_sequence_and_stop_strings(loaded):
    first, logits = _first_greedy_token(loaded, "hello there")
    engine = new_engine(loaded)
    engine.eos_ids = {first}
    out = run(engine, [EngineRequest("m", HARD, "hello there",
                                     sampling=SamplingParams(max_new_tokens=6, temperature=0.0, min_tokens=3))])["m"]
    assert out.completion_tokens >= 3
    held = logits.clone()
    held[first] = float("-inf")
    second = int(held.argmax())  # the best token that is not end-of-sequence
    assert engine.runner.trace["m"][0].argmax() == first  # the raw logits are unchanged ...
    assert out.finish_reason in ("length", "stop")
    got = loaded.tokenizer(out.text, add_special_tokens=False)["input_ids"]
    assert got[0] == second  # ... but the sampled token is the best one that is not EOS
    # a stop string that the first token completes ends the request at once, but not before min_tokens
    word = loaded.tokenizer.decode([first])
    stop = lambda n: SamplingParams(max_new_tokens=6, temperature=0.0, stop=(word,), min_tokens=n)  # noqa: E731
    at_once = run(new_engine(loaded), [EngineRequest("c0", HARD, "hello there", sampling=stop(0))])["c0"]
    assert (at_once.finish_reason, at_once.completion_tokens, at_once.text) == ("stop", 1, "")
    later = run(new_engine(loaded), [EngineRequest("c3", HARD, "hello there", sampling=stop(3))])["c3"]
    assert later.completion_tokens >= 3 and later.text.startswith(word)
    with pytest.raises(InvalidRequest, match="min_tokens"):
        SamplingParams(max_new_tokens=2, min_tokens=3)


def test_a_step_of_batch_rows_gives_way_between_layers_and_every_answer_stays_exact(loaded):
    """Interactive work arriving while a step of batch rows alone runs stops that step at its next layer: the step
    returns nothing, no sequence moves, and the rows' reruns give every request the tokens and log-probabilities
    it gets alone (the keys/values the abandoned layers wrote are overwritten)."""
    prefix = prompt_ref("prefix@1", PromptSpec(PromptKind.PREFIX_TUNING, 4, "Q: {input}"),
                        random_prompt(loaded, PromptKind.PREFIX_TUNING, 4, 1))
    pt = prompt_ref("pt@1", PromptSpec(PromptKind.PROMPT_TUNING, 4, "{input}"),
                    random_prompt(loaded, PromptKind.PROMPT_TUNING, 4, 2))
    reqs = [EngineRequest(f"b{i}", task, text, sampling=greedy(6), logprobs=2, priority="batch")
            for i, (task, text) in enumerate([(HARD, "one two three four five six"), (prefix, "seven eight"),
                                              (pt, "nine ten eleven twelve")])]
    chat = EngineRequest("i0", HARD, "an interactive question", sampling=greedy(4), logprobs=2)
    alone = {r.request_id: run(new_engine(loaded), [r])[r.request_id] for r in reqs + [chat]}

    engine = new_engine(loaded, max_prefill_tokens=8)        # prompts chunked: abandoned mid-prefill too
    layer = engine.runner.model.model.layers[0]
    hook = layer.register_forward_hook(lambda *_: engine.interrupt.set())  # "arrives" after layer 0's attention
    seqs = [engine.add_request(r) for r in reqs]
    assert engine.step() == [] and engine.abandoned_steps == 1
    hook.remove()
    engine.interrupt.clear()
    assert engine.scheduler.running and all(s.computed == 0 and not s.output_ids for s in seqs)
    finals, steps = {}, 0
    while engine.has_work():
        if steps == 2:                                       # one more abandoned step, at a decode this time
            engine.interrupt.set()
            assert engine.step() == [] and engine.abandoned_steps == 2
            engine.interrupt.clear()
            engine.add_request(chat)                         # what arrived; batch rows pause while it runs
        finals.update({o.request_id: o for o in engine.step() if o.finished})
        steps += 1
    for r in reqs + [chat]:
        got, want = finals[r.request_id], alone[r.request_id]
        assert got.new_token_ids == want.new_token_ids, r.request_id
        assert [(x.token, x.logprob, x.top) for x in got.logprobs] == \
            [(x.token, x.logprob, x.top) for x in want.logprobs], r.request_id


def test_an_interrupt_does_not_stop_a_step_with_interactive_rows(loaded):
    engine = new_engine(loaded)
    engine.add_request(EngineRequest("i", HARD, "hello there", sampling=greedy(2)))
    engine.add_request(EngineRequest("b", HARD, "hello there", sampling=greedy(2), priority="batch"))
    engine.interrupt.set()
    assert engine.step() != [] and engine.abandoned_steps == 0
