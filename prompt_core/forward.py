"""The forward pass with virtual tokens and prefix key/values injected; shared by serving and training."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from .arch import mask_layout, output_logits
from .batch import Readout, StepInputs, windowed


def embed(model: PreTrainedModel, step: StepInputs) -> torch.Tensor:
    """Token embeddings with each row's virtual tokens gathered in at their positions. [n, Q, D]"""
    embeds = model.get_input_embeddings()(step.ids)                   # [n, Q, D]
    if step.virtual_table is None:
        return embeds
    is_virtual = step.virt >= 0                                       # [n, Q]
    gathered = step.virtual_table[step.virt.clamp(min=0)]             # [n, Q, D]
    return torch.where(is_virtual[..., None], gathered.to(embeds.dtype), embeds)


def body(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack without the LM head."""
    return getattr(model, model.base_model_prefix)


def attention_masks(model: PreTrainedModel, step: StepInputs) -> torch.Tensor | dict[str, torch.Tensor]:
    """The step's layout mask with each layer type's window applied: one [n, 1, Q, K] mask where every layer
    attends alike, else a dict by layer type, which the model routes to its layers as its own masks."""
    layout = mask_layout(model.config)
    if layout.plain:
        return step.mask
    masks = [step.mask if w is None else windowed(step.mask, step.key_positions, step.positions, w)
             for w in layout.windows]
    if layout.keys == (None,):
        return masks[0]
    return dict(zip(layout.keys, masks))


def hidden_states(model: PreTrainedModel, step: StepInputs, cache) -> torch.Tensor:
    """Run the decoder over the step's queries; the cache holds the prefix and earlier tokens. [n, Q, D]"""
    out = body(model)(inputs_embeds=embed(model, step), attention_mask=attention_masks(model, step),
                      position_ids=step.positions, cache=cache, use_cache=True)
    return out.last_hidden_state


def logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM head and the model's own steps after it (softcapping, scaling) on only the hidden states asked for.
    [..., D] -> [..., V], at least fp32."""
    out = output_logits(model.config, model.get_output_embeddings()(hidden))
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def logits_width(model: PreTrainedModel) -> int:
    """How many logits the head gives (can exceed the tokenizer's vocabulary): its rows, float or quantized."""
    head = model.get_output_embeddings()
    if head is None:
        return int(model.config.vocab_size)
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def last_logits(model: PreTrainedModel, hidden: torch.Tensor, readout: Readout) -> torch.Tensor:
    """Next-token logits after each row's prompt. [n, V]"""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return logits(model, hidden[rows, readout.last_q])


def label_scores(model: PreTrainedModel, hidden: torch.Tensor, readout: Readout) -> list[torch.Tensor]:
    """Each label's full-verbalizer log-likelihood, per row (an empty tensor for generation rows)."""
    total = sum(readout.labels_per_row)
    if total == 0:
        return [hidden.new_zeros(0, dtype=torch.float32) for _ in readout.labels_per_row]
    # every label's first token is predicted by the same query (the prompt's last): run the LM head once per query
    flat = readout.label_row * hidden.shape[1] + readout.label_q      # [E]
    queries, which = torch.unique(flat, return_inverse=True)          # [U], [E]
    h = hidden.reshape(-1, hidden.shape[-1])[queries]                 # [U, D]
    logp = torch.log_softmax(logits(model, h), dim=-1)                # [U, V]
    tok_logp = logp[which, readout.label_tok]                         # [E]
    scores = torch.zeros(total, dtype=torch.float32, device=h.device).index_add_(0, readout.label_index, tok_logp)
    return list(torch.split(scores, readout.labels_per_row))


def prefix_cache(model: PreTrainedModel, prefixes: list[torch.Tensor | None], width: int) -> DynamicCache:
    """A cache whose first `width` slots hold each row's prefix (left-aligned, zero-padded and masked out).

    prefixes[i]: [L, 2, H_kv, T_i, Dh] or None. Gradients flow into the prefixes (training)."""
    cache = DynamicCache()
    if width == 0:
        return cache
    ref = next(p for p in prefixes if p is not None)
    L, _, H, _, Dh = ref.shape
    rows = []
    for p in prefixes:
        if p is None:
            p = ref.new_zeros(L, 2, H, 0, Dh)
        rows.append(torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[3])))  # [L, 2, H, width, Dh]
    kv = torch.stack(rows, dim=2)                                    # [L, 2, n, H, width, Dh]
    dtype = model.get_input_embeddings().weight.dtype
    for layer in range(L):
        cache.update(kv[layer, 0].to(dtype), kv[layer, 1].to(dtype), layer)
    return cache
