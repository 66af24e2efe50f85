"""A mixed batch gives every request exactly what it gets alone, and joining mid-decode changes nothing."""

from __future__ import annotations

import pytest
import torch

from prompt_core.spec import PromptKind, PromptSpec, make_labels
from server.engine.request import EngineRequest
from tests.helpers import default_model, greedy, new_engine, prompt_ref, random_prompt, run, tiny_llama

ATOL = 1e-4
NEW_TOKENS = 6


def mixed_requests(loaded) -> list[EngineRequest]:
    """Ten requests: all four kinds, P-tuning with anchors inside the template, classify mixed with generate,
    input lengths from 2 to ~30 tokens."""
    labels = make_labels({"positive": " positive", "negative": " negative", "mixed": " mixed feelings"})
    tasks = {
        "hard": (PromptSpec(PromptKind.HARD, 0, "Question: {input}\nAnswer:", labels), None),
        "pt": (PromptSpec(PromptKind.PROMPT_TUNING, 5, "Review: {input}\nSentiment:", labels),
               random_prompt(loaded, PromptKind.PROMPT_TUNING, 5, 1)),
        "ptune": (PromptSpec(PromptKind.P_TUNING, 6, "<v:4> Review: {input} <v:2> Sentiment:", labels),
                  random_prompt(loaded, PromptKind.P_TUNING, 6, 2)),
        "prefix": (PromptSpec(PromptKind.PREFIX_TUNING, 7, "{input}", labels),
                   random_prompt(loaded, PromptKind.PREFIX_TUNING, 7, 3)),
        "prefix2": (PromptSpec(PromptKind.PREFIX_TUNING, 3, "Q: {input} A:"),
                    random_prompt(loaded, PromptKind.PREFIX_TUNING, 3, 4)),
    }
    refs = {k: prompt_ref(f"{k}@1", spec, t) for k, (spec, t) in tasks.items()}
    texts = ["Hi", "The film was long but the ending made up for every slow minute of it.",
             "What is the capital of France?", "Terrible.", "I loved the soundtrack and the actors, but the plot "
             "was thin and the pacing dragged through the middle hour before a strong finish."]
    plan = [("hard", 2, "generate"), ("pt", 0, "generate"), ("ptune", 1, "generate"), ("prefix", 3, "generate"),
            ("prefix2", 4, "generate"), ("hard", 3, "classify"), ("pt", 4, "classify"), ("ptune", 0, "classify"),
            ("prefix", 1, "classify"), ("ptune", 4, "generate")]
    return [EngineRequest(f"r{i}", refs[task], texts[t], mode=mode, sampling=greedy(NEW_TOKENS))
            for i, (task, t, mode) in enumerate(plan)]


def check_same(loaded, together_engine, together, requests):
    for req in requests:
        alone_engine = new_engine(loaded)
        alone = run(alone_engine, [req])[req.request_id]
        got = together[req.request_id]
        assert got.finish_reason == alone.finish_reason, req.request_id
        if req.mode == "classify":
            assert got.labels == alone.labels
            assert max(abs(a - b) for a, b in zip(got.label_probs, alone.label_probs)) < ATOL, req.request_id
            continue
        assert got.text == alone.text, req.request_id
        mine, ref = together_engine.runner.trace[req.request_id], alone_engine.runner.trace[req.request_id]
        assert len(mine) == len(ref) >= 1
        for step, (a, b) in enumerate(zip(mine, ref)):
            assert torch.allclose(a, b, atol=ATOL, rtol=0), f"{req.request_id} step {step}: {(a - b).abs().max()}"


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_mixed_batch_equals_alone(which):
    loaded = tiny_llama() if which == "tiny" else default_model()
    requests = mixed_requests(loaded)
    engine = new_engine(loaded)
    together = run(engine, requests)
    assert set(together) == {r.request_id for r in requests}
    assert all(o.error is None for o in together.values())
    # every generation request produced tokens through the batched path
    assert all(len(engine.runner.trace[r.request_id]) >= 1 for r in requests if r.mode == "generate")
    check_same(loaded, engine, together, requests)


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_joining_mid_decode_changes_nothing(which):
    loaded = tiny_llama() if which == "tiny" else default_model()
    requests = mixed_requests(loaded)
    first, late = [r for r in requests[:6]], requests[6:]
    engine = new_engine(loaded)
    outs = run(engine, first, join_after={2: late[:2], 4: late[2:]})
    assert set(outs) == {r.request_id for r in requests}
    check_same(loaded, engine, outs, requests)


def test_rows_are_freed_and_reused():
    """Rows leave the batch when they finish, and later requests reuse the freed rows and blocks correctly."""
    loaded = tiny_llama()
    requests = mixed_requests(loaded)
    engine = new_engine(loaded, max_batch_size=3)
    outs = run(engine, requests)
    assert engine.kv_stats()["used_blocks"] == 0 and engine.scheduler.num_running == 0
    check_same(loaded, engine, outs, requests[:4])


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_cached_prompt_blocks_change_nothing(which):
    """Rows that start after cached blocks (a task's virtual tokens and fixed text, a repeated prompt) get the logits
    they get when every token is computed, on the first use (shared within the run) and on later ones."""
    loaded = tiny_llama() if which == "tiny" else default_model()
    requests = mixed_requests(loaded)
    plain = new_engine(loaded, prefix_caching=False)
    reference = run(plain, requests)
    cached = new_engine(loaded)
    for round_ in range(2):
        cached.runner.trace = {}
        outs = run(cached, requests)
        for req in requests:
            assert outs[req.request_id].text == reference[req.request_id].text
            if req.mode == "classify":
                assert outs[req.request_id].label_probs == pytest.approx(reference[req.request_id].label_probs,
                                                                          abs=ATOL)
                continue
            for a, b in zip(cached.runner.trace[req.request_id], plain.runner.trace[req.request_id]):
                assert torch.allclose(a, b, atol=ATOL, rtol=0), f"round {round_} {req.request_id}"
    stats = cached.kv_stats()
    full_blocks = sum((len(s.plan.ids) + s.plan.prefix) // 16 for s in map(cached.make_sequence, requests))
    assert full_blocks > 0 and stats["prefix_hits"] >= 16 * full_blocks // 2  # the second round reused them
    assert plain.kv_stats()["prefix_hits"] == 0 and plain.kv_stats()["prefix_queries"] == 0
