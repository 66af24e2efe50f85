"""The decode step compiled with torch.compile (inductor on a CPU, CUDA graphs on a GPU), built once at start-up.

Two graphs cover every decode step: one for a single row, one for any larger batch (on a CPU up to CPU_MAX_ROWS,
past which the eager step is faster). Both take the batch size, the
attended length and the cache's size as symbolic sizes (dynamic shapes), so a longer sequence, a new batch size or
a grown cache never recompiles. After `warm_up`, a step that would need a new graph runs eagerly instead (torch's
`fail_on_recompile` stance, caught and counted), so compiling never lands on a user's request. On a GPU the batch
is padded to a power of two and the attended length to a multiple of KV_BUCKET, so that CUDA graphs replay from a
bounded set of shapes.

At batch 1 every linear layer is a matrix-vector product. Torch's fp32 matmul reads the weights at ~12 GB/s on one
core; the single-row graph computes each product as a row-by-row dot product (`RowDot`), which inductor turns
into one vectorized reduction per layer at ~21 GB/s (measured on the 210 products of the default model). Every
output element is then one dot product over its row, whatever the batch, so a row's result depends on nothing else.
"""

from __future__ import annotations

import logging
import time
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from prompt_core import forward as fwd
from prompt_core.batch import build_decode

from .kv_cache import SlotCache

log = logging.getLogger(__name__)

KV_BUCKET = 256  # GPU: the attended length is rounded up to a multiple of this (masked slots change nothing)
# CPU: larger batches run eagerly. Measured on the default model, fp32, one thread: compiled/eager tokens/s
# 37.7/17.0 at batch 1, 125.8/118.8 at 16, 182.8/196.6 at 64
CPU_MAX_ROWS = 16


class RowDot(TorchFunctionMode):
    """Inside the single-row graph: a linear layer on one fp32 row [.., 1, D] is (W * x).sum(-1), which the
    compiler fuses into one reduction over W's rows (a matmul kernel reads fp32 weights at about half that speed).
    bf16 weights keep the model's matmul: their fused reduction measured slower than eager (17.0 vs 19.1 tokens/s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.shape[-1] and w.dim() == 2 and w.dtype == torch.float32:
                out = (w * x.reshape(1, -1)).sum(-1).reshape(*x.shape[:-1], w.shape[0])   # [.., 1, out]
                return out if bias is None else out + bias
        return func(*args, **kwargs)


def decode_logits(model, cache: SlotCache, ids: torch.Tensor, prefix: torch.Tensor, tok_start: torch.Tensor,
                  lengths: torch.Tensor, kv_len: int, dtype: torch.dtype, row_dot: bool = False) -> torch.Tensor:
    """One decode step's logits [n, V]: the eager path runs this as is, the compiled path compiles it.
    ids, prefix, tok_start, lengths: [n] per-row state (see ModelRunner)."""
    step = build_decode(ids, prefix, tok_start, lengths, kv_len, dtype)
    cache.prepare(slice(0, ids.shape[0]), step.slots, kv_len)
    if row_dot:
        with RowDot():
            return fwd.logits(model, fwd.hidden_states(model, step, cache)[:, 0])
    return fwd.logits(model, fwd.hidden_states(model, step, cache)[:, 0])                    # [n, V]


def compile_refusal(device: torch.device, quantization: str) -> str | None:
    """Why the compiled decode step cannot serve this model, or None."""
    if quantization != "none":
        return (f"--compile with --quantize {quantization}: the quantized layers call their own kernels, which the "
                "compiled step does not cover; use one or the other")
    if device.type not in ("cpu", "cuda"):
        return f"--compile runs on cpu and cuda, not {device.type}"
    return None


class CompiledDecode:
    """The compiled decode step. Call `warm_up` before serving; afterwards nothing compiles."""

    def __init__(self, model, cache: SlotCache, dtype: torch.dtype, device: torch.device):
        self.model, self.cache, self.dtype = model, cache, dtype
        self.pad = device.type == "cuda"   # CUDA graphs replay fixed shapes: pad batch and length to buckets
        # in bf16/fp16, round where the eager step rounds (fused kernels would otherwise keep fp32 in between);
        # on a GPU, replay CUDA graphs (what mode="reduce-overhead" turns on)
        options = {"emulate_precision_casts": True, "triton.cudagraphs": self.pad}
        self._single = torch.compile(_own_copy(decode_logits), dynamic=True, options=options)
        self._batched = torch.compile(_own_copy(decode_logits), dynamic=True, options=options)
        self.max_rows = None if self.pad else CPU_MAX_ROWS
        self.frozen = False
        self.compile_s = 0.0      # seconds spent compiling (warm-up)
        self.eager_steps = 0      # steps after warm-up that no compiled graph covered (run eagerly)

    def __call__(self, ids: torch.Tensor, prefix: torch.Tensor, tok_start: torch.Tensor, lengths: torch.Tensor,
                 kv_len: int) -> torch.Tensor:
        """Logits [n, V] of one decode step over rows 0..n-1 (padding rows, if any, are cut off)."""
        n = ids.shape[0]
        if self.max_rows is not None and n > self.max_rows:
            return decode_logits(self.model, self.cache, ids, prefix, tok_start, lengths, kv_len, self.dtype)
        if self.pad:
            ids, prefix, tok_start, lengths, kv_len = self._padded(ids, prefix, tok_start, lengths, kv_len)
        single = ids.shape[0] == 1
        fn = self._single if single else self._batched
        args = (self.model, self.cache, ids, prefix, tok_start, lengths, kv_len, self.dtype, single and not self.pad)
        if not self.frozen:
            return fn(*args)[:n]
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return fn(*args)[:n]
        except RuntimeError as e:  # a shape no graph covers: this step runs eagerly rather than compile now
            if "recompile" not in str(e):
                raise
            self.eager_steps += 1
            if self.eager_steps == 1:
                log.warning("a decode step needed a new compiled graph; it ran eagerly instead (%s)",
                            str(e).splitlines()[-1].strip())
            return decode_logits(*args)[:n]

    def _padded(self, ids, prefix, tok_start, lengths, kv_len):
        """Rows up to a power of two (padding rows write slot 0 of rows nobody owns) and the length up to a bucket."""
        n = ids.shape[0]
        rows = 1 << (n - 1).bit_length()
        kv = -(-kv_len // KV_BUCKET) * KV_BUCKET
        self.cache.ensure(rows, kv)
        for buf in self.cache.keys + self.cache.values:  # updated in place, so a CUDA graph may keep its address
            torch._dynamo.mark_static_address(buf)
        kv = min(kv, self.cache.capacity[1])
        if rows > n:
            pad = lambda t: torch.cat([t, t.new_zeros(rows - n)])  # noqa: E731
            ids, prefix, tok_start, lengths = pad(ids), pad(prefix), pad(tok_start), pad(lengths)
        return ids, prefix, tok_start, lengths, max(kv, kv_len)

    def warm_up(self, run_steps) -> float:
        """Compile both graphs before serving: `run_steps(batch)` must decode a few steps with `batch` rows.
        Returns the seconds it took; then freezes, so that a shape no graph covers runs eagerly."""
        t = time.perf_counter()
        # sizes stay apart from each other: a length equal to a buffer's size would otherwise share its symbol
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for batch in (1, 2):
                run_steps(batch)
        self.compile_s = time.perf_counter() - t
        self.frozen = True
        return self.compile_s


def _own_copy(fn):
    """fn with a code object of its own: torch.compile keeps graphs per code object, so each graph and each engine
    gets its own cache of them (and its own recompile limit) instead of sharing one."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_graphs() -> int:
    """Graphs compiled in this process so far (torch's own count): the tests see recompiles with it."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
