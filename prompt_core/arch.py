"""What the engine must know of a model, read from the model itself rather than from one config field.

- Key/value geometry: one forward of one token with a plain cache shows the true shape of every layer's keys and
  values (multi-query Falcon and GPT-BigCode keep 1 KV head whatever `num_key_value_heads` says; Falcon's new
  decoder architecture keeps `num_kv_heads`; some models set `head_dim` apart from hidden/heads).
- Attention windows per layer: `layer_types` where the config has them (Gemma 2/3, Qwen2 ...), else one
  `sliding_window` for every layer (Mistral, Phi-3), else full causal attention.
- The output path after the LM head: final-logit softcapping (Gemma 2/3), logit scaling (Cohere, Granite).

A model whose cache, layers or attention kinds fall outside this is refused with `UnsupportedModel`, whose text
names the architecture and the reason, so the operator never gets silently wrong answers or a bare traceback.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModel(ValueError):
    """This model cannot be served exactly; the message says which architecture and why."""


@dataclass(frozen=True)
class KVGeometry:
    """The shape of what every attention layer keeps per token: [kv_heads, head_dim] keys and values."""
    layers: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MaskLayout:
    """The attention masks a forward needs: one per distinct layer type, each with its window (None: full).

    `keys[i]` is None when the model takes one 4D mask for every layer, else the layer type the model looks up in
    a dict of masks (transformers' `causal_mask_mapping`)."""
    keys: tuple[str | None, ...]
    windows: tuple[int | None, ...]

    @property
    def plain(self) -> bool:
        return self.keys == (None,) and self.windows == (None,)

    @property
    def smallest_window(self) -> int | None:
        sized = [w for w in self.windows if w is not None]
        return min(sized) if sized else None


def architecture(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    names = getattr(config, "architectures", None)
    return names[0] if names else (type(model_or_config).__name__ if hasattr(model_or_config, "config")
                                   else getattr(config, "model_type", "unknown"))


def check_config(config) -> None:
    """Refuse what no forward can make exact: encoder-decoder models and attention kinds the masks do not model."""
    arch = architecture(config)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{arch} is an encoder-decoder model; the engine serves decoder-only causal LMs")
    mask_layout(config)


def mask_layout(config) -> MaskLayout:
    """Per layer type, its attention window, as the model's own mask functions apply it."""
    arch = architecture(config)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        unknown = sorted({t for t in types if t not in (FULL, SLIDING)})
        if unknown:
            raise UnsupportedModel(f"{arch} has attention layers of kind {', '.join(unknown)}; the engine models "
                                   f"only {FULL} and {SLIDING}")
        kinds = sorted(set(types))
        if SLIDING in kinds and not window:
            raise UnsupportedModel(f"{arch} has sliding-attention layers but no sliding_window size")
        if len(kinds) == 1:
            return MaskLayout((None,), (window if kinds[0] == SLIDING else None,))
        return MaskLayout(tuple(kinds), tuple(window if k == SLIDING else None for k in kinds))
    if window and getattr(config, "use_sliding_window", True):
        return MaskLayout((None,), (int(window),))
    return MaskLayout((None,), (None,))


_GEOMETRY: "weakref.WeakKeyDictionary[PreTrainedModel, KVGeometry]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def kv_geometry(model: PreTrainedModel) -> KVGeometry:
    """The true per-layer key/value shape, from one forward of one token (cached per model object)."""
    if model in _GEOMETRY:
        return _GEOMETRY[model]
    arch = architecture(model)
    body = getattr(model, model.base_model_prefix, None)
    if body is None:
        raise UnsupportedModel(f"{arch} has no decoder body at .{model.base_model_prefix}")
    cache = DynamicCache()
    param = next(model.parameters())
    ids = torch.zeros(1, 1, dtype=torch.long, device=param.device)
    try:
        body(input_ids=ids, position_ids=torch.zeros_like(ids), cache=cache, use_cache=True)
    except Exception as e:  # any failure here means the cache protocol is not the one we drive
        raise UnsupportedModel(f"{arch} does not run with a transformers key/value cache "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    layers = [layer for layer in getattr(cache, "layers", []) if getattr(layer, "keys", None) is not None
              and layer.keys.numel() > 0]
    expected = model.config.num_hidden_layers
    if not layers:
        raise UnsupportedModel(f"{arch} keeps no attention key/value cache (a recurrent or state-space model?); "
                               "the engine serves attention models")
    if len(layers) != expected:
        raise UnsupportedModel(f"{arch} caches keys/values in {len(layers)} of its {expected} layers (shared or "
                               "hybrid layers); the engine needs one cache entry per layer")
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in layers}
    if len(shapes) != 1:
        raise UnsupportedModel(f"{arch} keeps keys/values of different shapes in different layers {sorted(shapes)}; "
                               "the engine needs one shape for all layers")
    (k_shape, v_shape), = shapes
    if len(k_shape) != 4 or k_shape != v_shape or k_shape[0] != 1 or k_shape[2] != 1:
        raise UnsupportedModel(f"{arch} caches keys {k_shape} and values {v_shape} per token; the engine needs "
                               "[batch, kv_heads, tokens, head_dim] for both")
    geometry = KVGeometry(layers=len(layers), kv_heads=k_shape[1], head_dim=k_shape[3])
    _GEOMETRY[model] = geometry
    return geometry


def output_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """The model's own steps after its LM head, as its forward applies them (checked against the model's own
    forward by tests and at server start)."""
    scale = getattr(config, "logit_scale", None)           # Cohere: logits * logit_scale
    if scale is not None and not isinstance(scale, bool):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)      # Granite: logits / logits_scaling
    if scaling is not None:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def attn_implementation(config, requested: str = "auto") -> str:
    """SDPA where it computes what the model defines; eager where the attention has steps SDPA cannot do
    (attention-logit softcapping). An operator's explicit choice is kept, except one that would be inexact."""
    arch = architecture(config)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if requested in ("auto", "", None):
        return "eager" if softcap is not None else "sdpa"
    if requested not in ("sdpa", "eager"):
        raise UnsupportedModel(f"attn_implementation={requested!r}: the engine gives every row its own 4D attention "
                               "mask, which only sdpa and eager take")
    if softcap is not None and requested != "eager":
        raise UnsupportedModel(f"{arch} soft-caps its attention logits, which attn_implementation={requested!r} "
                               "does not do; use eager (or auto)")
    return requested
