"""Attention over the paged cache, plugged into the model's own code through transformers' attention interface.

The model runs its own layers (projections, rotary, norms, MLP); only the attention of one query over its keys is
ours, because keys and values now live in blocks: `PagedKVCache.update` writes the step's keys/values into their
slots and hands the layer's pools to the attention function, and the kernel (csrc/paged_attention.c) reads each
query's blocks in place. Outside a paged step (training on the resident model, the start-up check's reference
forward) the same model computes attention exactly as it did before: the registered function hands over to the
implementation the model was loaded with, masks included.

Most architectures call attention through `ALL_ATTENTION_FUNCTIONS`; the few that call
`F.scaled_dot_product_attention` themselves (Falcon) are served by catching that call while a paged step runs.
Which of the two a model needs is found by running it (`install`), and a model that reaches attention by neither
path is refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from prompt_core import kernels
from prompt_core.arch import UnsupportedModel, architecture

log = logging.getLogger(__name__)

IMPLEMENTATION = "promptserve_paged"
SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
LANES = 16  # the kernel's vector width in floats: a block holds a multiple of this many slots


# ---------------------------------------------------------------------------------------------------------- kernel
class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("T", "Hq", "Hkv", "D", "B", "W")] + \
               [(n, ctypes.c_int64) for n in ("q_st", "q_sh", "o_st", "o_sh")] + \
               [("window", ctypes.c_int32), ("scale", ctypes.c_float), ("softcap", ctypes.c_float)]


def build(cache_dir: Path | None = None) -> Path:
    """The kernel compiled for this machine (built once, then kept under the cache directory)."""
    return kernels.build(SOURCE, cache_dir)


def kernel() -> ctypes.CDLL:
    """The compiled kernel library, built on first use."""
    return kernels.load(SOURCE, ("paged_attention_bf16", "paged_attention_f32"))


def kernel_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16, torch.float32) if device.type == "cpu" else ()


# ------------------------------------------------------------------------------------------------------ step data
@dataclass
class GroupStep:
    """What one layer group's attention needs for this step (all int32 on the kernel's device)."""
    block_table: torch.Tensor   # [S, W] physical block of each sequence's logical block
    window: int                 # 0: full attention


@dataclass
class QueryMeta:
    """Per query token of the step, [T] int32 each: see the kernel's header for what a query sees."""
    seq: torch.Tensor        # row of the block tables
    slot: torch.Tensor       # its own slot
    pos: torch.Tensor        # its position
    ctx_end: torch.Tensor    # end of the shared context [0, ctx_end) (0 for plain tokens)
    seg_start: torch.Tensor  # start of its own segment [seg_start, slot]


class StepAbandoned(Exception):
    """A background step gave way to interactive work between two layers; nothing it computed is kept."""


@dataclass
class PagedStep:
    queries: QueryMeta
    groups: list[GroupStep]
    layer_group: list[int]       # group of each layer
    block_size: int
    abandon: Callable[[], bool] | None = None   # asked before each layer's attention: True stops the step
    _args: dict = field(default_factory=dict)   # kernel arguments, built once per step and layout

    def kernel_args(self, group: int, q: torch.Tensor, out: torch.Tensor, B: int, Hkv: int, scale: float,
                    softcap: float) -> tuple:
        """The dimensions struct and the metadata pointers, the same for every layer of a group in this step."""
        key = (group, q.shape, q.stride(), Hkv, scale, softcap)
        args = self._args.get(key)
        if args is None:
            T, Hq, D = q.shape
            g = self.groups[group]
            dims = _Dims(T, Hq, Hkv, D, B, g.block_table.shape[1], q.stride(0), q.stride(1), out.stride(0),
                         out.stride(1), g.window, scale, softcap)
            m = self.queries
            ptrs = tuple(ctypes.c_void_p(t.data_ptr()) for t in (m.seq, m.slot, m.pos, m.ctx_end, m.seg_start,
                                                                  g.block_table))
            args = self._args[key] = (ctypes.byref(dims), ptrs, dims)
        return args


_STEP: contextvars.ContextVar[PagedStep | None] = contextvars.ContextVar("paged_step", default=None)


@contextlib.contextmanager
def paged_step(step: PagedStep, intercept_sdpa: bool):
    """Run the model's forward with attention over the paged cache (this thread only)."""
    token = _STEP.set(step)
    try:
        if intercept_sdpa:
            with _SdpaToPaged():
                yield
        else:
            yield
    finally:
        _STEP.reset(token)


# ------------------------------------------------------------------------------------------------------ attention
def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: int, scale: float,
           softcap: float | None, step: PagedStep) -> torch.Tensor:
    """query [1, Hq, T, D]; keys [NB, Hkv, D, B] and values [NB, Hkv, B, D] (the layer's pools).
    Returns [1, T, Hq, D] (the layout the model's attention output takes)."""
    if step.abandon is not None and step.abandon():
        raise StepAbandoned(f"abandoned at layer {layer}")
    q = query[0].transpose(0, 1)                                        # [T, Hq, D] (a view)
    if q.stride(-1) != 1:
        q = q.contiguous()
    T, Hq, D = q.shape
    NB, Hkv, _, B = keys.shape
    if Hq % Hkv:
        raise UnsupportedModel(f"{Hq} query heads cannot share {Hkv} key/value heads evenly")
    gi = step.layer_group[layer]
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if q.dtype not in kernel_dtypes(q.device):
        return reference_attend(q, keys, values, step.groups[gi], step.queries, scale, softcap)[None]
    dims, meta, _ = step.kernel_args(gi, q, out, B, Hkv, scale, float(softcap or 0.0))
    fn = kernel().paged_attention_bf16 if q.dtype == torch.bfloat16 else kernel().paged_attention_f32
    ptr = ctypes.c_void_p
    fn(dims, ptr(q.data_ptr()), ptr(keys.data_ptr()), ptr(values.data_ptr()), ptr(out.data_ptr()), *meta)
    return out[None]                                                    # [1, T, Hq, D]


def reference_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: GroupStep, m: QueryMeta,
                     scale: float, softcap: float | None) -> torch.Tensor:
    """The kernel's semantics in plain torch, one scheduled sequence at a time: its blocks gathered into one run of
    keys, and SDPA (or softmax, with softcapping) under the visibility mask. For devices and dtypes the kernel does
    not cover (not batch-invariant: its rounding depends on the gathered lengths), and the tests' reference.
    q [T, Hq, D] -> [T, Hq, D]."""
    T, Hq, D = q.shape
    _, Hkv, _, B = keys.shape
    out = torch.empty_like(q)
    acc = torch.promote_types(q.dtype, torch.float32)                            # at least fp32
    seqs = m.seq.long()
    for s in torch.unique(seqs).tolist():
        rows = (seqs == s).nonzero()[:, 0]                                       # this sequence's queries
        me, pos = m.slot[rows].long(), m.pos[rows].long()
        ce, ss = m.ctx_end[rows].long(), m.seg_start[rows].long()
        n = int(me.max()) + 1
        slots = torch.arange(n, device=q.device)                                 # [S]
        blocks = group.block_table[s].long().clamp(min=0)[slots // B]
        k = keys[blocks, :, :, slots % B].transpose(0, 1).to(acc)                # [Hkv, S, D]
        v = values[blocks, :, slots % B, :].transpose(0, 1).to(acc)
        vis = (slots[None] < ce[:, None]) | ((slots[None] >= ss[:, None]) & (slots[None] <= me[:, None]))
        if group.window:
            key_pos = torch.where(slots[None] < ce[:, None], slots[None], pos[:, None] - (me[:, None] - slots[None]))
            vis &= key_pos > pos[:, None] - group.window                         # [Tq, S]
        qs = q[rows].transpose(0, 1).to(acc)                                     # [Hq, Tq, D]
        k, v = k.repeat_interleave(Hq // Hkv, 0), v.repeat_interleave(Hq // Hkv, 0)
        w = (qs @ k.transpose(1, 2)) * scale                                     # [Hq, Tq, S]
        if softcap:
            w = torch.tanh(w / softcap) * softcap
        w = w.masked_fill(~vis[None], float("-inf")).softmax(-1)
        out[rows] = (w @ v).transpose(0, 1).to(q.dtype)
    return out


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                     **kwargs):
    """transformers' attention interface. In a paged step: the kernel over the pools `key`/`value`. Otherwise the
    implementation the model was loaded with, unchanged."""
    step = _STEP.get()
    if step is None:
        return _base_attention(module)(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, softcap=softcap, **kwargs)
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise UnsupportedModel(f"{type(module).__name__} has attention sinks, which the paged kernel does not model")
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    return attend(query, key, value, module.layer_idx, float(scaling), softcap, step), None


def _base_attention(module):
    impl = getattr(module.config, "_promptserve_base_attn", "sdpa")
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface._global_mapping[impl]


def _paged_mask(*args, config=None, **kwargs):
    """Outside a paged step, the mask of the implementation the model was loaded with."""
    impl = getattr(config, "_promptserve_base_attn", "sdpa")
    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl](*args, config=config, **kwargs)


class _SdpaToPaged(TorchFunctionMode):
    """For models that call F.scaled_dot_product_attention themselves: a call whose keys are a pool of the step's
    cache becomes the kernel; every other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = args[:3]
            cache = _CACHE_OF.get()
            layer = cache.layer_of_pool(key) if cache is not None else None
            step = _STEP.get()
            if layer is not None and step is not None:
                scale = kwargs.get("scale") or 1.0 / math.sqrt(query.shape[-1])
                return attend(query, key, value, layer, float(scale), None, step).transpose(1, 2)
        return func(*args, **kwargs)


_CACHE_OF: contextvars.ContextVar = contextvars.ContextVar("paged_cache", default=None)


# --------------------------------------------------------------------------------------------------------- install
def _register() -> None:
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, _paged_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, _paged_mask)


def install(model: PreTrainedModel) -> bool:
    """Route the model's attention through the paged kernel in paged steps. Returns whether the model's own
    SDPA calls must be caught instead (a model that does not use the attention interface)."""
    _register()
    config = model.config
    base = getattr(config, "_promptserve_base_attn", None) or config._attn_implementation or "sdpa"
    if base not in ("sdpa", "eager"):
        raise UnsupportedModel(f"attn_implementation={base!r}: the engine serves sdpa and eager models")
    uses_interface = _calls_interface(model)
    if uses_interface:
        for sub in {id(c): c for c in (config, config.get_text_config())}.values():
            sub._promptserve_base_attn = base
            sub._attn_implementation = IMPLEMENTATION
        return False
    if base != "sdpa":
        raise UnsupportedModel(f"{architecture(model)} computes attention in its own code without SDPA, which the "
                               "paged key/value cache cannot serve")
    return True


def _calls_interface(model: PreTrainedModel) -> bool:
    """Whether the model's attention layers call transformers' attention interface (seen by running one token)."""
    seen = []

    def spy(module, query, *args, **kwargs):
        seen.append(module)
        return torch.zeros_like(query).transpose(1, 2), None   # [b, q, h, d]; only the call matters

    config = model.config
    saved = config._attn_implementation
    AttentionInterface.register("promptserve_probe", spy)
    try:
        config._attn_implementation = "promptserve_probe"
        body = getattr(model, model.base_model_prefix)
        ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad():
            body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except Exception:  # noqa: BLE001 - a model that cannot run so is told apart below
        seen.clear()
    finally:
        config._attn_implementation = saved
        AttentionInterface._global_mapping.pop("promptserve_probe", None)
    return len(seen) > 0


@contextlib.contextmanager
def cache_context(cache):
    token = _CACHE_OF.set(cache)
    try:
        yield
    finally:
        _CACHE_OF.reset(token)
