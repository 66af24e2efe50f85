"""The paged key/value cache end to end on tiny models: a burst several times larger than the budget completes with
every answer equal to the request alone and memory inside the budget; a task's prefix is held once by all its
concurrent requests; tasks with the same text and different soft prompts never share a block; sliding-window
layers give their old blocks back; a request the cache can never hold is refused at once."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from prompt_core.model import LoadedModel, freeze
from prompt_core.spec import PromptKind, PromptSpec
from server.engine.request import EngineRequest, InputTooLong, SamplingParams
from tests.helpers import greedy, new_engine, prompt_ref, random_prompt, run, tiny_llama, tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def per_token_bytes(engine) -> int:
    return engine.cache.shape.block_bytes(len(engine.cache.keys)) // engine.blocks.block_size


def test_a_burst_four_times_the_budget_completes_exactly_within_it():
    loaded = tiny_llama()
    probe = new_engine(loaded)
    budget = 24 * 16 * per_token_bytes(probe)                  # 24 blocks of 16 slots
    engine = new_engine(loaded, max_batch_size=16, kv_cache_bytes=budget)
    assert engine.cache.bytes() <= budget and engine.blocks.pools[0].num_blocks == 24
    reqs = [EngineRequest(f"r{i}", prompt_ref("hard@1", PromptSpec(PromptKind.HARD, 0, "{input}"), None),
                          text(i, 60 + i % 5), sampling=greedy(40)) for i in range(12)]
    need = sum(-(-(engine.make_sequence(r).max_slots) // 16) for r in reqs)
    assert need >= 4 * 24                                        # the burst's KV is 4x what the cache holds
    peak = []
    real = engine.runner.run

    def watch(batch, *rest):
        peak.append(engine.blocks.stats()["used"])
        return real(batch, *rest)

    engine.runner.run = watch
    outs = run(engine, reqs)
    assert max(peak) <= 24 and engine.kv_stats()["preempted_memory"] > 0
    assert engine.kv_stats()["used_blocks"] == 0
    for r in reqs:
        alone = run(new_engine(loaded), [r])[r.request_id]
        assert outs[r.request_id].text == alone.text and outs[r.request_id].completion_tokens == 40, r.request_id


def test_64_requests_of_one_prefix_tuning_task_hold_its_prefix_once():
    loaded = tiny_llama()
    T = 64
    ref = prompt_ref("prefix@1", PromptSpec(PromptKind.PREFIX_TUNING, T, "{input}"),
                     random_prompt(loaded, PromptKind.PREFIX_TUNING, T, 3))
    engine = new_engine(loaded, max_batch_size=64)
    block = engine.cache.shape.block_bytes(len(engine.cache.keys))
    reqs = [EngineRequest(f"p{i}", ref, text(i, 3), sampling=greedy(6)) for i in range(64)]
    for r in reqs:
        engine.add_request(r)
    shared = []
    while engine.has_work():
        engine.step()
        shared.append((engine.kv_stats()["shared_bytes"], engine.scheduler.num_running))
    # while all 64 run, the 64-slot prefix (4 blocks) is held once, by reference, instead of 64 times
    assert max(b for b, n in shared if n == 64) == 4 * block
    alone = run(new_engine(loaded), [reqs[5]])["p5"]
    outs = run(new_engine(loaded), reqs)
    assert outs["p5"].text == alone.text


def test_tasks_with_the_same_text_and_other_soft_prompts_never_share_a_block():
    loaded = tiny_llama()
    spec = PromptSpec(PromptKind.PROMPT_TUNING, 16, "{input}")
    a = prompt_ref("a@1", spec, random_prompt(loaded, PromptKind.PROMPT_TUNING, 16, 1))
    b = prompt_ref("b@1", spec, random_prompt(loaded, PromptKind.PROMPT_TUNING, 16, 2))
    words = text(0, 40)
    engine = new_engine(loaded)
    first = run(engine, [EngineRequest("a", a, words, sampling=greedy(8))])["a"]
    hits = engine.kv_stats()["prefix_hits"]
    second = run(engine, [EngineRequest("b", b, words, sampling=greedy(8))])["b"]
    assert engine.kv_stats()["prefix_hits"] == hits               # nothing of task a served to task b
    assert second.text == run(new_engine(loaded), [EngineRequest("b", b, words, sampling=greedy(8))])["b"].text
    again = run(engine, [EngineRequest("a2", a, words, sampling=greedy(8))])["a2"]
    assert engine.kv_stats()["prefix_hits"] > hits and again.text == first.text   # task a's own blocks are reused


def tiny_mistral(window: int = 16) -> LoadedModel:
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=window, attn_implementation="sdpa")
    return LoadedModel(model=freeze(MistralForCausalLM(cfg)), tokenizer=tokenizer(), source="mistral",
                       device=torch.device("cpu"), dtype=torch.float32)


def test_sliding_window_layers_free_the_blocks_they_can_no_longer_see():
    loaded = tiny_mistral(window=16)
    engine = new_engine(loaded, max_prefill_tokens=32)
    req = EngineRequest("s", prompt_ref("h@1", PromptSpec(PromptKind.HARD, 0, "{input}"), None), text(1, 40),
                        sampling=SamplingParams(max_new_tokens=80, temperature=0.0, ignore_eos=True))
    seq = engine.add_request(req)
    held = []
    while engine.has_work():
        engine.step()
        if seq.blocks.tables[0]:
            held.append(sum(1 for b in seq.blocks.tables[0] if b >= 0))
    assert len(seq.output_ids) == 80
    # 40 prompt + 80 generated tokens would be 8 blocks; a 16-token window needs at most 3 at a time
    assert max(held) <= 3 and engine.kv_stats()["used_blocks"] == 0
    assert not engine.blocks.prefix_caching


def test_a_request_larger_than_the_cache_is_refused_at_once():
    loaded = tiny_llama()
    probe = new_engine(loaded)
    engine = new_engine(loaded, kv_cache_bytes=8 * 16 * per_token_bytes(probe))    # 128 slots
    ref = prompt_ref("h@1", PromptSpec(PromptKind.HARD, 0, "{input}"), None)
    assert engine.add_request(EngineRequest("ok", ref, text(0, 20), sampling=greedy(64)))
    with pytest.raises(InputTooLong, match="key/value cache holds 128"):
        engine.add_request(EngineRequest("big", ref, text(0, 20), sampling=greedy(200)))
