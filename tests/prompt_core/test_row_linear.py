"""prompt_core/row_linear.py and csrc/row_linear.c: every row gets the bits it gets alone, at every row count,
position, thread count and stride; the result is the linear layer's (close to F.linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prompt_core import row_linear as rl

ROW_COUNTS = [*range(1, 20), 31, 64, 239, 240, 241, 500]    # past one register tile, one row block (240) and more


def _case(dtype, N=37, K=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(max(ROW_COUNTS), K, generator=g).to(dtype)
    return w, b, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_every_row_gets_its_bits_alone_at_every_row_count(dtype):
    w, b, x = _case(dtype)
    packed = rl.pack(w)
    alone = torch.cat([rl.row_linear(x[i:i + 1], packed, b, w.shape[0]) for i in range(x.shape[0])])
    for m in ROW_COUNTS:
        assert torch.equal(rl.row_linear(x[:m], packed, b, w.shape[0]), alone[:m]), m
    shuffled = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    assert torch.equal(rl.row_linear(x[shuffled], packed, b, w.shape[0]), alone[shuffled])   # position in the call
    want = F.linear(x.float(), w.float(), b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(alone.float(), want, rtol=tol, atol=tol)
    assert alone.dtype == dtype


@torch.inference_mode()
def test_threads_strides_and_leading_dims_do_not_change_the_bits():
    w, b, x = _case(torch.float32, N=70, K=33, bias=False, seed=1)
    packed = rl.pack(w)
    one = rl.row_linear(x[:9], packed, None, 70)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(rl.row_linear(x[:9], packed, None, 70), one)
    finally:
        torch.set_num_threads(threads)
    wide = torch.zeros(9, 40)
    wide[:, 3:36] = x[:9]                                     # a view with a row stride of 40
    assert torch.equal(rl.row_linear(wide[:, 3:36], packed, None, 70), one)
    assert torch.equal(rl.row_linear(x[:9].T.contiguous().T, packed, None, 70), one)   # column-major input
    assert torch.equal(rl.row_linear(x[:9].reshape(3, 3, 33), packed, None, 70), one.reshape(3, 3, 70))
    assert rl.row_linear(x[:0], packed, None, 70).shape == (0, 70)


def test_other_dtypes_are_refused_with_a_message():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        rl.pack(torch.randn(4, 4, dtype=torch.float16))
