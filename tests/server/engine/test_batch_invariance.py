"""Batch invariance at the precision the server picks by default (bf16 on this project's CPUs; on a CPU without native
bf16, whatever `--dtype auto` picks there, which the test prints): 16 and then 64 concurrent greedy requests that
mix all four prompt kinds, constrained and free rows and classify rows, with prompts chunked across steps and (for
64) preemptions forced by a small key/value budget, give every request exactly the tokens and log-probabilities it
gets alone."""

from __future__ import annotations

import functools

import pytest
import torch

from prompt_core.model import load_model
from prompt_core.spec import PromptKind, PromptSpec, make_labels
from server.engine import constraints as C
from server.engine.request import EngineRequest, SamplingParams
from tests.helpers import new_engine, prompt_ref, random_prompt, run

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
QUESTIONS = ["What makes the sea salty?", "Write two lines about autumn leaves.", "Explain gravity to a child.",
             "Name three uses of copper.", "Why do cats purr?", "Describe a busy market at dawn.",
             "How does a bicycle stay upright?", "Give advice to a new gardener."]


@functools.lru_cache(maxsize=1)
def served():
    loaded = load_model(dtype="auto", serving=True)
    print(f"batch invariance at the served default: {loaded.dtype}")
    return loaded


@functools.lru_cache(maxsize=1)
def requests() -> list[EngineRequest]:
    """Built once: the prefix-tuning prompt is the model's own cache for random tokens, and the first engine makes
    the model's linear layers batch-invariant, which moves their last bits; a second build after it would hand the
    lone runs a different prefix from the batched ones."""
    loaded = served()
    chat = prompt_ref("chat@1", PromptSpec(PromptKind.HARD, 0,
                                           "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"), None)
    pt = prompt_ref("pt@1", PromptSpec(PromptKind.PROMPT_TUNING, 8, "Question: {input}\nAnswer:"),
                    random_prompt(loaded, PromptKind.PROMPT_TUNING, 8, 1))
    ptun = prompt_ref("ptun@1", PromptSpec(PromptKind.P_TUNING, 8, "<v:4>Question: {input}<v:4>\nAnswer:"),
                      random_prompt(loaded, PromptKind.P_TUNING, 8, 2))
    prefix = prompt_ref("prefix@1", PromptSpec(PromptKind.PREFIX_TUNING, 8, "Question: {input}\nAnswer:"),
                        random_prompt(loaded, PromptKind.PREFIX_TUNING, 8, 3))
    cls = prompt_ref("cls@1", PromptSpec(PromptKind.PROMPT_TUNING, 8, "Review: {input}\nSentiment:",
                                         labels=make_labels(["positive", "negative", "mixed"])),
                     random_prompt(loaded, PromptKind.PROMPT_TUNING, 8, 4))
    free = lambda: SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)  # noqa: E731
    out = []
    for i, q in enumerate(QUESTIONS):
        task = (chat, pt, ptun, prefix)[i % 4]
        out.append(EngineRequest(f"free-{i}", task, q, sampling=free(), logprobs=2))
    out.append(EngineRequest("json-0", chat, "Give me a JSON object for a person called Ada aged 36.", logprobs=1,
                             sampling=SamplingParams(max_new_tokens=64, temperature=0.0,
                                                     constraint=C.json_schema(PERSON))))
    out.append(EngineRequest("json-1", pt, "A person named Bo who is 7 years old, as JSON.", logprobs=1,
                             sampling=SamplingParams(max_new_tokens=64, temperature=0.0,
                                                     constraint=C.json_schema(PERSON))))
    out.append(EngineRequest("date", prefix, "When did the first moon landing happen?", logprobs=1,
                             sampling=SamplingParams(max_new_tokens=64, temperature=0.0,
                                                     constraint=C.regex(r"\d{4}-\d{2}-\d{2}"))))
    for i, t in enumerate(("Loved every minute of it.", "Dull and far too long.", "Fine music, weak plot.")):
        out.append(EngineRequest(f"cls-{i}", cls, t, mode="classify"))
    out.append(EngineRequest("echo", chat, "Score this sentence please.", echo=True, logprobs=2,
                             sampling=SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)))
    out.append(EngineRequest("free-long", ptun, " ".join(QUESTIONS), sampling=free(), logprobs=2))
    assert len(out) == 16
    return out


def same(got, want, rid: str) -> None:
    assert got.error is None and want.error is None, rid
    assert got.text == want.text and got.completion_tokens == want.completion_tokens, rid
    assert got.label_probs == want.label_probs, rid
    for name in ("logprobs", "prompt_logprobs"):
        a, b = getattr(got, name) or [], getattr(want, name) or []
        assert [(x.token, x.logprob, x.top) for x in a] == [(x.token, x.logprob, x.top) for x in b], (rid, name)


@functools.lru_cache(maxsize=1)
def alone_outputs():
    loaded = served()
    out = {}
    for r in requests():
        out[r.request_id] = run(new_engine(loaded, prefix_caching=False), [r])[r.request_id]
    return out


@pytest.mark.parametrize("copies", [1, 4])
def test_every_request_gets_the_bits_it_gets_alone(copies):
    loaded = served()
    base = requests()
    reqs = [EngineRequest(**{**r.__dict__, "request_id": f"{r.request_id}#{k}"}) for k in range(copies)
            for r in base]
    kw = {}
    if copies > 1:  # 64 rows under a budget smaller than they need: some are preempted and recomputed
        probe = new_engine(loaded)
        per_slot = probe.cache.shape.block_bytes(len(probe.cache.keys)) // probe.blocks.block_size
        kw["kv_cache_bytes"] = 3000 * per_slot
    engine = new_engine(loaded, max_batch_size=64, max_prefill_tokens=96, **kw)  # prompts chunked, mixed with decode
    assert engine.batch_invariant, engine.invariance_gaps
    outs = run(engine, reqs)
    assert len(reqs) == 16 * copies
    if copies > 1:
        assert engine.kv_stats()["preempted_memory"] > 0
    assert max(len(o.logprobs or []) for o in outs.values()) >= 64
    alone = alone_outputs()
    for r in reqs:
        same(outs[r.request_id], alone[r.request_id.split("#")[0]], r.request_id)
    assert torch.get_num_threads() >= 1


def test_the_fast_default_path_gives_the_tokens_of_torchs_own_linear_layers():
    """The invariant engine's linear layers are the row kernel (float32); with --no-batch-invariant they are torch's
    own F.linear. Greedy tokens are the same for every prompt kind, log-probabilities within rounding."""
    plain, fast = load_model(dtype="float32", serving=True), load_model(dtype="float32", serving=True)
    kinds = [("hard@1", PromptSpec(PromptKind.HARD, 0, "Question: {input}\nAnswer:"), None)]
    for i, (kind, text) in enumerate([(PromptKind.PROMPT_TUNING, "Question: {input}\nAnswer:"),
                                      (PromptKind.P_TUNING, "<v:4>Question: {input}<v:4>\nAnswer:"),
                                      (PromptKind.PREFIX_TUNING, "Question: {input}\nAnswer:")]):
        kinds.append((f"{kind.value}@1", PromptSpec(kind, 8, text), random_prompt(plain, kind, 8, 10 + i)))
    reqs = [EngineRequest(f"{tid}-{j}", prompt_ref(tid, spec, prompt), q, logprobs=1,
                          sampling=SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True))
            for tid, spec, prompt in kinds for j, q in enumerate(QUESTIONS[:2])]
    torch_linear = new_engine(plain, batch_invariant=False)
    assert not any(type(m).__name__ == "RowLinear" for m in plain.model.modules())
    want = run(torch_linear, reqs)
    row_kernel = new_engine(fast)
    assert row_kernel.batch_invariant and any(type(m).__name__ == "RowLinear" for m in fast.model.modules())
    got = run(row_kernel, reqs)
    for r in reqs:
        a, b = got[r.request_id], want[r.request_id]
        assert a.text == b.text, r.request_id
        torch.testing.assert_close([x.logprob for x in a.logprobs], [x.logprob for x in b.logprobs],
                                   rtol=1e-3, atol=1e-3)
