"""server/engine/attention.py and csrc/paged_attention.c: the kernel against a plain reference over every kind of
visibility (causal, prefix, label segments, windows), grouped-query heads, softcapping, both CPU dtypes; and that a
query's result is the same bits whatever else is in the step."""

from __future__ import annotations

import pytest
import torch

from server.engine import attention
from server.engine.attention import GroupStep, PagedStep, QueryMeta, attend, reference_attend


def step_data(Hq: int, Hkv: int, D: int, B: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    NB, W = 48, 8
    keys = torch.randn(NB, Hkv, D, B, generator=g).to(dtype)
    values = torch.randn(NB, Hkv, B, D, generator=g).to(dtype)
    table = torch.stack([torch.randperm(NB, generator=g)[:W] for _ in range(3)]).int()      # [S=3, W]
    # seq 0: one decode query at slot 37; seq 1: a prefill chunk, slots 10..20; seq 2: three label tokens that see
    # the prompt [0, 12) and their own segment from slot 14, at positions 12..14
    seq = [0] + [1] * 11 + [2] * 3
    slot = [37] + list(range(10, 21)) + [14, 15, 16]
    pos = [37] + list(range(10, 21)) + [12, 13, 14]
    ctx = [0] * 12 + [12] * 3
    seg = [0] * 12 + [14] * 3
    meta = QueryMeta(*(torch.tensor(x, dtype=torch.int32) for x in (seq, slot, pos, ctx, seg)))
    q = torch.randn(len(seq), Hq, D, generator=g).to(dtype)
    return q, keys, values, table, meta


def run(q, keys, values, table, meta, window=0, softcap=None, scale=0.3):
    step = PagedStep(meta, [GroupStep(table, window)], layer_group=[0], block_size=keys.shape[-1])
    return attend(q.transpose(0, 1)[None], keys, values, 0, scale, softcap, step)[0]         # [T, Hq, D]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("Hq, Hkv, D, B, window, softcap", [
    (9, 3, 64, 16, 0, None),    # the default model's heads
    (4, 1, 16, 16, 6, None),    # multi-query, a window shorter than the chunk
    (4, 4, 32, 32, 0, 20.0),    # softcapping, wider blocks
    (8, 2, 24, 16, 5, None),    # a head size that is no multiple of the vector width
])
def test_kernel_equals_the_reference(dtype, tol, Hq, Hkv, D, B, window, softcap):
    q, keys, values, table, meta = step_data(Hq, Hkv, D, B, dtype)
    got = run(q, keys, values, table, meta, window, softcap)
    want = reference_attend(q.double(), keys.double(), values.double(), GroupStep(table, window), meta, 0.3, softcap)
    assert (got.double() - want).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_alone_as_in_any_step(dtype):
    q, keys, values, table, meta = step_data(9, 3, 64, 16, dtype)
    together = run(q, keys, values, table, meta, window=5)
    for t in range(q.shape[0]):
        one = QueryMeta(*(x[t:t + 1].clone() for x in (meta.seq, meta.slot, meta.pos, meta.ctx_end, meta.seg_start)))
        alone = run(q[t:t + 1].clone(), keys, values, table, one, window=5)
        assert torch.equal(alone[0], together[t]), t


def test_the_kernel_is_built_once_and_kept(tmp_path):
    first = attention.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert attention.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
