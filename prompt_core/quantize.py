"""Lower-precision weights for the frozen model's linear layers, on torch's own CPU kernels.

Why not a library's tensor subclass: measured on the default model's layer shapes at batch 1 on one CPU thread,
torchao 0.18's `Int8DynamicActivationInt8WeightConfig` in eager mode took 113 ms per token of matmuls against 36 ms
in fp32 (per-call subclass dispatch); the aten kernels it would reach under `torch.compile` take 21 ms called
directly. So the weights are quantized here (a few lines of absmax / min-max arithmetic) and multiplied by aten:

  int8  W8A8: int8 weights per output channel, int8 activations per row (dynamic), `torch._int_mm` with exact int32
        accumulation. Each row is quantized on its own and integer sums are exact, so a row's output does not
        depend on what else is in the batch. Fastest from ~8 rows up on CPUs with VNNI (1.6x fp32 at batch 1).
  int4  weight-only: 4-bit weights in groups along the input (scale and zero per group), bf16 activations,
        `_weight_int4pack_mm_for_cpu`. Fewest bytes per token: fastest at batch 1, slower than int8 past ~8 rows.

Only `nn.Linear` modules are replaced, the LM head included (GPT-2-style `Conv1D` layers stay float; the input
embedding stays as it is, so soft prompts enter exactly as before). The replaced modules have no gradient: a
quantized model serves, it does not train.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32  # llama.cpp's Q4 block size; must divide every linear layer's input width


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 weights (per output channel) and int8 activations (per row)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()                                          # [out, in]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127                         # [out]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight_t", q.t().contiguous())                       # [in, out], _int_mm's layout
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()                                        # [rows, in]
        xs = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127              # [rows, 1]
        xq = torch.round(x2 / xs).to(torch.int8)
        y = torch._int_mm(xq, self.qweight_t).float().mul_(xs).mul_(self.scale)      # [rows, out], int32 exact
        if self.bias is not None:
            y += self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T + b with 4-bit weights in groups of INT4_GROUP inputs: w = q * scale + min per group."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        w = linear.weight.detach().float()                                          # [out, in]
        out, inp = w.shape
        g = w.reshape(out, inp // group, group)                                     # [out, groups, group]
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        # The kernel computes (q - 8) * scale + zero with scale and zero in bf16: round them first, then pick each
        # q against the rounded pair (the levels the kernel really has), not against the exact one.
        scale = ((hi - lo).clamp(min=1e-12) / 15).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        q = torch.round((g - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(out, inp)
        sz = torch.stack([scale.reshape(out, -1).t(), zero.reshape(out, -1).t()], dim=-1)     # [groups, out, 2]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16).contiguous())
        self.group = group
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)                             # [rows, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)                 # [..., out]

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [out, in] in float (bf16 scale and zero, as the kernel reads them)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros)
        return w.float().t()


def check_quantization(mode: str, model: nn.Module, device: torch.device) -> str | None:
    """Why `mode` cannot apply to this model here, or None. A reason is a sentence for the operator."""
    if mode not in QUANTIZATIONS:
        return f"unknown quantization {mode!r}; expected one of {', '.join(QUANTIZATIONS)}"
    if mode == "none":
        return None
    if device.type != "cpu":
        return f"--quantize {mode} runs on torch's CPU kernels; on {device.type} serve in bfloat16 instead"
    if mode == "int4":
        widths = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})
        bad = [w for w in widths if w % INT4_GROUP]
        if bad:
            return f"--quantize int4 needs every linear layer's input width divisible by {INT4_GROUP}; found {bad}"
    return None


def quantization_of(model: nn.Module) -> str:
    """Which of QUANTIZATIONS this model's linear layers run in."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            return "int8"
        if isinstance(m, Int4Linear):
            return "int4"
    return "none"


def quantize_linears(model: nn.Module, mode: str) -> int:
    """Replace every nn.Linear of `model` in place by its `mode` counterpart; returns how many were replaced.

    A tied LM head gets its own quantized copy; the input embedding keeps the float weight."""
    if mode == "none":
        return 0
    make = {"int8": Int8Linear, "int4": Int4Linear}[mode]
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(linear))
    if hasattr(model.config, "tie_word_embeddings") and targets:
        # The head is no longer the embedding's weight: keep transformers from re-tying it on a later call.
        model.config.tie_word_embeddings = False
    return len(targets)
