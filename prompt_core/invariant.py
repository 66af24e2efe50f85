"""Batch-invariant linear layers on the CPU: every output row is the same bits whatever other rows share the call.

torch's bf16 and fp32 matmuls choose their blocking by the number of rows: on this project's reference CPU (AMX)
a bf16 `F.linear` gives rows 1..32 one result and rows 33 and up another (1 to 245 of 256 rows differ in the last
bit), and fp32 gives a single row one result and two or more another. So a request's answer changed with what else
was batched. Two fixes, one per layer:

- float32 layers, and bf16 layers on a CPU without native bf16 (oneDNN emulates it there, or has no kernel at
  all without AVX-512), run the row kernel (prompt_core/row_linear.py, csrc/row_linear.c): each output element is
  one multiply-add chain over k in order, invariant by construction, and faster than torch's own at small batch
  (30 vs 49 ms for the default model's layers at one row on an AVX2 host);
- bf16 layers on a CPU with native bf16 (AVX-512 BF16, AMX) keep torch's oneDNN kernel with fixed shapes: the
  weight is prepacked once (`mkldnn._reorder_linear_weight`, as inductor's CPU freezing does), which fixes the
  kernel's reduction blocking in the packed layout, and rows go through in tiles of at most `tile` rows (a tile of
  one row padded to `pad`), a size at which every tile gives each row the bits it gets alone.

Which tile and padding hold is measured, not assumed: `calibrate` runs each distinct layer shape at every row
count up to the tile and compares with rows run one at a time; a shape for which no tile holds runs the row kernel.
The results are kept in the cache directory, keyed by CPU, torch version, shape, dtype and threads, so later
starts skip the measurement.

With gradients enabled (training on the resident model) a layer runs the plain `F.linear` on the same weight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prompt_core import row_linear
from prompt_core.model import cpu_has_native_bf16

log = logging.getLogger(__name__)

TILES = (1024, 512, 256, 128, 64, 32, 16, 8)   # tried largest first (a prefill chunk up to 1024 rows in one call)
HEAD_TILE = 128                # layers wider than WIDE (LM heads) stop here: they see few rows, and are slow to probe
WIDE = 8192
PADS = (1, 2)                  # rows a one-row tile is padded to
DENSE = 130                    # every row count up to this is probed; beyond it every 8th and the edges


@dataclass(frozen=True)
class Tiling:
    tile: int
    pad: int


class _ServedLinear(nn.Module):
    """A frozen linear layer in a serving-time form: the model's own weight and bias are kept (ties and state_dict
    too), `product` computes x @ W.T in that form; with gradients enabled (training on the resident model) the plain
    F.linear runs on the same weight."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, bias_after: bool = False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bias_after = bias_after                     # (x @ W.T) + b, rounded twice, as some models write it

    def product(self, x: torch.Tensor, fused_bias: bool) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            if self.bias_after:
                return x @ self.weight.T + (self.bias if self.bias is not None else 0)
            return F.linear(x, self.weight, self.bias)
        if self.bias_after:
            out = self.product(x, fused_bias=False)
            return out if self.bias is None else out + self.bias
        return self.product(x, fused_bias=True)

    def __deepcopy__(self, memo):
        """A copy is a plain nn.Linear with copied weights (the serving-time layout is a form of them that torch
        cannot copy; a copy is made to change dtype or device, where it no longer applies)."""
        import copy

        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = copy.deepcopy(self.weight, memo)
        plain.bias = copy.deepcopy(self.bias, memo) if self.bias is not None else None
        return plain


class InvariantLinear(_ServedLinear):
    """oneDNN's kernel on a prepacked weight, in fixed row tiles (see the module docstring)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tiling: Tiling, bias_after: bool = False):
        super().__init__(weight, bias, bias_after)
        self.tiling = tiling
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def product(self, x: torch.Tensor, fused_bias: bool) -> torch.Tensor:
        return tiled(self.packed, self.bias if fused_bias else None, x, self.tiling)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tile={self.tiling.tile}, pad={self.tiling.pad}"


class RowLinear(_ServedLinear):
    """The row kernel (prompt_core/row_linear.py): invariant by construction, no tiles to measure."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, bias_after: bool = False):
        super().__init__(weight, bias, bias_after)
        with torch.no_grad():
            self.packed = row_linear.pack(weight)

    def product(self, x: torch.Tensor, fused_bias: bool) -> torch.Tensor:
        bias = self.bias if fused_bias else None             # read at each call: the model's own parameter
        if bias is not None:
            bias = bias.detach().float().contiguous()        # the kernel adds a float32 bias (a no-op for fp32)
        return row_linear.row_linear(x, self.packed, bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, row kernel"


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def tiled(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """x [..., K] -> [..., N], rows in tiles of `tiling.tile` (a one-row tile padded to `tiling.pad` rows)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])                                          # [M, K]
    if not rows.is_contiguous():
        rows = rows.contiguous()
    M = rows.shape[0]
    if 1 < M <= tiling.tile or (M == 1 and tiling.pad == 1):                 # one tile: the common case
        out = packed_linear(packed, bias, rows)
        return out.reshape(*shape[:-1], out.shape[-1])
    outs = []
    for start in range(0, rows.shape[0], tiling.tile):
        part = rows[start:start + tiling.tile]
        if part.shape[0] == 1 and tiling.pad > 1:
            outs.append(packed_linear(packed, bias, part.expand(tiling.pad, -1).contiguous())[:1])
        else:
            outs.append(packed_linear(packed, bias, part))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(*shape[:-1], out.shape[-1])


def probe_rows(tile: int) -> list[int]:
    """Row counts probed for a tile: all up to DENSE, then every 8th and the ones around each power of two."""
    ms = set(range(2, min(tile, DENSE) + 1)) | set(range(DENSE, tile + 1, 8)) | {tile - 1, tile}
    ms |= {p + d for p in (2 ** k for k in range(8, 11)) for d in (-1, 0, 1)}
    return sorted(m for m in ms if 2 <= m <= tile)


@torch.inference_mode()
def calibrate(weight: torch.Tensor, bias: torch.Tensor | None, tiles=TILES, pads=PADS) -> Tiling | None:
    """The largest tile (and the padding) at which every probed row count up to the tile gives each row exactly
    the result it gets alone; None if none does."""
    if weight.shape[0] > WIDE:
        tiles = tuple(t for t in tiles if t <= HEAD_TILE)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    except RuntimeError:  # e.g. bf16 on a CPU without AVX-512: oneDNN has no such kernel, so no tiling holds
        return None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(max(tiles), weight.shape[1], generator=g) * weight.float().std().clamp(min=1e-3) * 30
         ).to(weight.dtype)
    for pad in pads:
        alone = torch.cat([tiled(packed, bias, x[i:i + 1], Tiling(1, pad)) for i in range(x.shape[0])])
        for tile in tiles:
            t = Tiling(tile, pad)
            if all(torch.equal(tiled(packed, bias, x[:m], t), alone[:m]) for m in probe_rows(tile)):
                return t
    return None


def _linears(model: nn.Module):
    """(parent, name, module, weight [N, K], transposed, bias added apart) of every linear layer: nn.Linear, GPT-2's
    Conv1D (weight [K, N]), and subclasses of nn.Linear that add the bias after the product (Falcon's)."""
    from transformers.pytorch_utils import Conv1D

    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                yield parent, name, child, child.weight, False, False
            elif type(child) is Conv1D:
                yield parent, name, child, child.weight, True, False
            elif isinstance(child, nn.Linear) and _adds_bias_after(child):
                yield parent, name, child, child.weight, False, True


@torch.inference_mode()
def _adds_bias_after(module: nn.Linear) -> bool:
    """Whether a subclass of nn.Linear computes exactly (x @ W.T) + b (checked on a few rows, bit for bit)."""
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(module.weight.dtype)
    want = x @ module.weight.T
    if module.bias is not None:
        want = want + module.bias
    try:
        return torch.equal(module(x), want)
    except Exception:  # noqa: BLE001 - a layer that cannot run so is simply not replaced
        return False


def _key(weight: torch.Tensor, has_bias: bool) -> str:
    cpu = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    blob = f"{torch.__version__}|{torch.backends.mkldnn.is_available()}|{cpu}|{tuple(weight.shape)}|{weight.dtype}|" \
           f"{has_bias}|{torch.get_num_threads()}|{TILES}|{PADS}|{DENSE}|{HEAD_TILE}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def make_batch_invariant(model: nn.Module, cache_file: Path | None = None) -> list[str]:
    """Replace the model's linear layers by batch-invariant ones (InvariantLinear where a oneDNN tiling holds,
    RowLinear otherwise). Returns the layers left alone (empty: every linear layer is batch-invariant): CPU,
    bf16/fp32 weights only; others, and quantized layers for which no tiling holds, are reported."""
    known: dict[str, list[int] | None] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            known = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            known = {}
    failed: list[str] = []
    before = len(known)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    failed += tile_quantized(model, torch.bfloat16 if _has_int4(model) else dtype, known)
    changed = len(known) != before
    native_bf16 = torch.backends.mkldnn.is_available() and cpu_has_native_bf16()
    for parent, name, module, weight, transposed, bias_after in list(_linears(model)):
        bias = module.bias
        w = weight.detach().t().contiguous() if transposed else weight
        if w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float32):
            failed.append(f"{name} {tuple(w.shape)} {w.dtype} on {w.device}")
            continue
        weight_param = nn.Parameter(w, requires_grad=False) if transposed else weight
        tiling = None
        if w.dtype == torch.bfloat16 and native_bf16:          # oneDNN's bf16 kernel in tiles, where they hold
            fused = None if bias_after else bias
            key = _key(w, fused is not None)
            if key not in known:
                t = calibrate(w, fused)
                known[key] = [t.tile, t.pad] if t else None
                changed = True
            tiling = known[key]
        if tiling is None:
            layer = RowLinear(weight_param, bias, bias_after=bias_after)
        else:
            layer = InvariantLinear(weight_param, bias, Tiling(*tiling), bias_after=bias_after)
        setattr(parent, name, layer)
    if changed and cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=0))
            os.replace(tmp, cache_file)
        except OSError as e:
            log.warning("could not keep the batch-invariance calibration in %s: %s", cache_file, e)
    return sorted(set(failed))


class TiledQuantized(nn.Module):
    """A quantized linear layer (prompt_core/quantize.py) run in fixed row tiles: its own kernel, at a tile for
    which every row gets the bits it gets alone (measured, as for InvariantLinear)."""

    def __init__(self, inner: nn.Module, tiling: Tiling):
        super().__init__()
        self.inner, self.tiling = inner, tiling
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        outs = []
        for start in range(0, rows.shape[0], self.tiling.tile):
            part = rows[start:start + self.tiling.tile]
            if part.shape[0] == 1 and self.tiling.pad > 1:
                outs.append(self.inner(part.expand(self.tiling.pad, -1).contiguous())[:1])
            else:
                outs.append(self.inner(part))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(*shape[:-1], out.shape[-1])


@torch.inference_mode()
def calibrate_module(module: nn.Module, dtype: torch.dtype, tiles=(128, 64, 32, 16, 8), pads=PADS) -> Tiling | None:
    """calibrate() for a layer that is its own kernel (quantized): the largest tile at which every probed row count
    gives each row its bits alone."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(max(tiles), module.in_features, generator=g) * 3).to(dtype)
    for pad in pads:
        one = TiledQuantized(module, Tiling(1, pad))
        alone = torch.cat([one(x[i:i + 1]) for i in range(x.shape[0])])
        for tile in tiles:
            t = TiledQuantized(module, Tiling(tile, pad))
            if all(torch.equal(t(x[:m]), alone[:m]) for m in probe_rows(tile)):
                return Tiling(tile, pad)
    return None


def tile_quantized(model: nn.Module, dtype: torch.dtype, cache: dict) -> list[str]:
    """Wrap every quantized linear layer in TiledQuantized where a tiling holds; returns the layers where none does.
    `cache` maps a layer's shape and kind to its tiling (or None), as make_batch_invariant keeps it."""
    from .quantize import Int4Linear, Int8Linear

    failed = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (Int8Linear, Int4Linear)):
                continue
            key = f"{type(child).__name__}|{child.in_features}x{child.out_features}|{dtype}|{torch.__version__}|" \
                  f"{torch.get_num_threads()}"
            if key not in cache:
                t = calibrate_module(child, dtype)
                cache[key] = [t.tile, t.pad] if t else None
            if cache[key] is None:
                failed.append(f"{name} {type(child).__name__} {child.in_features}x{child.out_features}")
            else:
                setattr(parent, name, TiledQuantized(child, Tiling(*cache[key])))
    return sorted(set(failed))


def _has_int4(model: nn.Module) -> bool:
    from .quantize import Int4Linear

    return any(isinstance(m, Int4Linear) for m in model.modules())


def is_batch_invariant_linear(module: nn.Module) -> bool:
    return isinstance(module, (_ServedLinear, TiledQuantized))
