"""Shared test builders: tiny random models, engines, and PEFT reference logits."""

from __future__ import annotations

import functools

import torch
from transformers import AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from prompt_core.model import LoadedModel, ensure_default_model_dir, freeze, load_model
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors
from server.engine.config import EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.request import EngineRequest, PromptRef, SamplingParams


@functools.lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ensure_default_model_dir()))


def tiny_llama(seed: int = 0) -> LoadedModel:
    """A random Llama with grouped-query attention (4 heads, 2 KV heads) and the default model's tokenizer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="sdpa")
    model = freeze(LlamaForCausalLM(cfg))
    return LoadedModel(model=model, tokenizer=tokenizer(), source="tiny", device=torch.device("cpu"),
                       dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def default_model() -> LoadedModel:
    return load_model()


def random_prompt(loaded: LoadedModel, kind: str, T: int, seed: int) -> PromptTensors | None:
    """Random soft-prompt tensors on the scale of the model's own embeddings/keys."""
    g = torch.Generator().manual_seed(seed)
    cfg = loaded.model.config
    D = cfg.hidden_size
    if kind == PromptKind.HARD:
        return None
    if kind in (PromptKind.PROMPT_TUNING, PromptKind.P_TUNING):
        scale = loaded.model.get_input_embeddings().weight.std().item()
        return PromptTensors(virtual=torch.randn(T, D, generator=g) * scale)
    # A prefix on the scale of real keys/values: the model's own cache for T random tokens (as a trained prefix
    # would be), not unit noise, whose outlier logits would test float rounding rather than the engine.
    ids = torch.randint(100, cfg.vocab_size, (1, T), generator=g)
    with torch.no_grad():
        cache = DynamicCache()  # keeps every token (a config-built cache trims sliding layers to their window)
        loaded.model(input_ids=ids, cache=cache, use_cache=True)
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # [L, 2, H, T, Dh]
    return PromptTensors(prefix=kv.clone())


def prompt_ref(key: str, spec: PromptSpec, tensors: PromptTensors | None) -> PromptRef:
    return PromptRef(key=key, spec=spec, load=lambda: tensors)


def run(engine: LLMEngine, requests: list[EngineRequest], *, join_after: dict[int, list[EngineRequest]] | None = None):
    """Run requests to completion; `join_after[k]` adds more requests after step k. Returns final outputs by id."""
    for r in requests:
        engine.add_request(r)
    finals, step = {}, 0
    join_after = dict(join_after or {})
    while engine.has_work() or join_after:
        for r in join_after.pop(step, []):
            engine.add_request(r)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
    return finals


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def new_engine(loaded: LoadedModel, max_batch_size: int = SchedulerConfig.max_batch_size,
               max_prefill_tokens: int = SchedulerConfig.max_prefill_tokens, **cfg) -> LLMEngine:
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=max_batch_size,
                                                                      max_prefill_tokens=max_prefill_tokens), **cfg))
    engine.runner.trace = {}
    return engine
