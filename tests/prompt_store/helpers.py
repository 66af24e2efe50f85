"""Shared test helpers: a tiny GQA Llama, our forward's logits, and PEFT adapters to compare against."""

from __future__ import annotations

import torch

from prompt_core.batch import build_prefill
from prompt_core.forward import hidden_states, logits, prefix_cache
from prompt_core.layout import plan_row
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors


def tiny_llama(seed: int = 0):
    """A random 2-layer Llama with grouped-query attention (4 heads, 2 KV heads), fp32, eval, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def our_logits(model, tokenizer, spec: PromptSpec, tensors: PromptTensors | None, text: str) -> torch.Tensor:
    """Logits of every query of one row through prompt_core's batched forward. [Q, V]"""
    plan = plan_row(spec, tokenizer, text)
    dev = model.device
    dtype = model.get_input_embeddings().weight.dtype
    virtual = None if tensors is None else tensors.virtual
    prefix = None if tensors is None else tensors.prefix
    step, _ = build_prefill([plan], tok_start=[plan.prefix], virtual=[virtual], device=dev, dtype=dtype)
    cache = prefix_cache(model, [prefix], width=plan.prefix)
    h = hidden_states(model, step, cache)      # [1, Q, D]
    return logits(model, h)[0]                 # [Q, V]


def real_ids(spec: PromptSpec, tokenizer, text: str) -> list[int]:
    """The real tokens PEFT must be fed to match our row (the filled-in template, no virtual tokens)."""
    plan = plan_row(spec, tokenizer, text)
    return [t for t, v in zip(plan.ids, plan.virt) if v < 0]


@torch.no_grad()
def peft_logits(peft_model, ids: list[int]) -> torch.Tensor:
    """PEFT's forward (the oracle). [T+S, V] for prompt/P-tuning, [S, V] for prefix tuning."""
    input_ids = torch.tensor([ids], device=peft_model.device)
    out = peft_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return out.logits[0].float()


def make_peft_config(method: str, T: int):
    """A PEFT config for one of: prompt_tuning, p_tuning_mlp, p_tuning_lstm, prefix_tuning, prefix_projection."""
    import peft
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T)
    if method.startswith("p_tuning"):
        enc = "LSTM" if method.endswith("lstm") else "MLP"
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, encoder_hidden_size=32,
                                        encoder_reparameterization_type=enc)
    if method.startswith("prefix"):
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T,
                                       prefix_projection=method == "prefix_projection", encoder_hidden_size=32)
    raise ValueError(method)


KIND_OF = {"prompt_tuning": PromptKind.PROMPT_TUNING, "p_tuning_mlp": PromptKind.P_TUNING,
           "p_tuning_lstm": PromptKind.P_TUNING, "prefix_tuning": PromptKind.PREFIX_TUNING,
           "prefix_projection": PromptKind.PREFIX_TUNING}
