"""The row kernel (csrc/row_linear.c) from torch: a linear layer whose every output element is one multiply-add
chain over k in order, so a row gets the same bits whatever else shares the call (see the C file's header).

Measured on an AVX2 host (2 threads, the default model's 30 layers of distinct weights, float32): 30 ms at one row
against 49 ms for `F.linear` and 79 ms for oneDNN's packed kernel padded to the two rows it needs to be invariant;
1.4x oneDNN at 64 rows and 1.0x at 256 (prefill).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from prompt_core import kernels

SOURCE = Path(__file__).parent / "csrc" / "row_linear.c"
LANES = 16          # output columns per panel of the packed weight
DTYPES = (torch.float32, torch.bfloat16)

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


_FNS: dict[str, ctypes._CFuncPtr] = {}


def _fn(name: str) -> ctypes._CFuncPtr:
    """A kernel function, looked up once (a decode step calls the kernel about 200 times)."""
    fn = _FNS.get(name)
    if fn is None:
        lib = kernels.load(SOURCE, ("row_linear_f32", "row_linear_bf16"))
        fn = _FNS[name] = getattr(lib, name)
        fn.argtypes = [_P, _I64, _P, _P, _P, _I64, _I32, _I32, _I32, _I32]
    return fn


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (float32 or bf16, CPU) -> [ceil(N / LANES), K, LANES], the kernel's layout (columns past N
    are zero)."""
    if weight.dtype not in DTYPES or weight.device.type != "cpu":
        raise ValueError(f"the row kernel takes float32 or bfloat16 weights on the CPU, not {weight.dtype} on "
                         f"{weight.device}")
    N, K = weight.shape
    P = (N + LANES - 1) // LANES
    w = F.pad(weight.detach(), (0, 0, 0, P * LANES - N))                  # [P * LANES, K], zero rows past N
    return w.reshape(P, LANES, K).transpose(1, 2).contiguous()           # [P, K, LANES]


def row_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [..., K] -> [..., N] in the packed weight's dtype; bias float32 [N] or None (added once, in float32)."""
    shape = x.shape
    K = shape[-1]
    rows = x.reshape(-1, K).to(torch.float32)               # [M, K]; bf16 widens exactly
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < K):
        rows = rows.contiguous()
    M = rows.shape[0]
    out = torch.empty(M, out_features, dtype=packed.dtype)  # [M, N]
    if M:
        fn = _fn("row_linear_f32" if packed.dtype == torch.float32 else "row_linear_bf16")
        fn(rows.data_ptr(), rows.stride(0), packed.data_ptr(), None if bias is None else bias.data_ptr(),
           out.data_ptr(), out_features, M, out_features, K, torch.get_num_threads())
    return out.reshape(*shape[:-1], out_features)
