"""A base-model fingerprint: prompts trained for one model must not be served on another."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import torch
from transformers import PreTrainedModel

from .arch import kv_geometry


@dataclass(frozen=True)
class ModelFingerprint:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    embedding_sha256: str  # of the input embeddings rounded to bf16, so fp32 and bf16 loads agree

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelFingerprint":
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"fingerprint is missing {sorted(missing)}")
        return cls(**{k: data[k] for k in names})

    def differences(self, other: "ModelFingerprint") -> list[str]:
        """Human-readable 'field: expected X, found Y' lines (self is what is expected)."""
        return [f"{f.name}: expected {getattr(self, f.name)!r}, found {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def model_dims(model: PreTrainedModel) -> tuple[int, int, int, int, int]:
    """(hidden, layers, heads, kv_heads, head_dim): the key/value geometry as the model really caches it (a
    multi-query model keeps one KV head whatever its config's num_key_value_heads says)."""
    config = model.config
    kv = kv_geometry(model)
    return config.hidden_size, kv.layers, config.num_attention_heads, kv.kv_heads, kv.head_dim


@torch.no_grad()
def fingerprint(model: PreTrainedModel) -> ModelFingerprint:
    config = model.config
    hidden, layers, heads, kv, head_dim = model_dims(model)
    weight = model.get_input_embeddings().weight.detach()
    raw = weight.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return ModelFingerprint(architecture=arch, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            num_kv_heads=kv, head_dim=head_dim, vocab_size=weight.shape[0],
                            embedding_sha256=hashlib.sha256(raw).hexdigest())
