"""prompt_core/invariant.py: calibrated row tiles give each row the bits it gets alone; float32 layers, and bf16
layers oneDNN cannot pack, run the row kernel; the calibration is kept and reused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prompt_core import invariant as inv
from tests.helpers import tiny_llama

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (every x86 CPU build)")


def test_probe_rows_cover_every_small_count_and_the_edges():
    rows = inv.probe_rows(512)
    assert rows[:inv.DENSE - 1] == list(range(2, inv.DENSE + 1))
    assert {255, 256, 257, 511, 512} <= set(rows) and max(rows) == 512 and min(rows) == 2
    assert inv.probe_rows(8) == list(range(2, 9))


@torch.inference_mode()
def test_calibrated_tiles_give_each_row_its_bits_alone():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    t = inv.calibrate(w, b, tiles=(64, 16), pads=(1, 2))
    assert t is not None
    layer = inv.InvariantLinear(nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False), t)
    x = torch.randn(150, 64, generator=g)                    # more rows than a tile: several tiles and a remainder
    batched = layer(x)
    for i in (0, 1, 63, 64, 65, 149):
        assert torch.equal(batched[i], layer(x[i:i + 1])[0]), i
    torch.testing.assert_close(batched, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_bf16_runs_the_row_kernel_where_onednn_cannot_pack_it(monkeypatch):
    """bf16 on a CPU without AVX-512: oneDNN refuses to pack the weight, so no tiling holds; the row kernel serves
    those layers and the model is still batch-invariant."""
    def refuse(*_a, **_k):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    monkeypatch.setattr(inv, "cpu_has_native_bf16", lambda: True)   # oneDNN is tried first, and refuses
    assert inv.calibrate(torch.randn(16, 8), None) is None
    model = tiny_llama().model.to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 0]])
    want = model(ids).logits.float()
    assert inv.make_batch_invariant(model) == []
    assert not any(isinstance(m, inv.InvariantLinear) for m in model.modules())
    assert any(isinstance(m, inv.RowLinear) for m in model.modules())
    got = model(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@torch.inference_mode()
def test_float32_layers_run_the_row_kernel_and_keep_the_outputs():
    loaded = tiny_llama()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    want = loaded.model(ids).logits
    assert inv.make_batch_invariant(loaded.model) == []
    replaced = [m for m in loaded.model.modules() if isinstance(m, inv.RowLinear)]
    assert len(replaced) == sum(1 for m in tiny_llama().model.modules() if type(m) is nn.Linear)
    assert all(inv.is_batch_invariant_linear(m) for m in replaced)
    torch.testing.assert_close(loaded.model(ids).logits, want, rtol=1e-4, atol=1e-4)
    plain = copy.deepcopy(replaced[0])                       # a copy (to another dtype or device) is a plain layer
    assert type(plain) is nn.Linear and torch.equal(plain.weight, replaced[0].weight)


def test_training_on_the_resident_model_runs_the_plain_linear():
    layer = inv.RowLinear(nn.Parameter(torch.randn(24, 16)), None)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()                                # gradients flow through F.linear on the same weight
    assert x.grad is not None and layer.weight.grad is not None


@torch.inference_mode()
def test_the_bf16_calibration_is_kept_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(inv, "cpu_has_native_bf16", lambda: True)
    cache = tmp_path / "invariance.json"
    assert inv.make_batch_invariant(tiny_llama().model.to(torch.bfloat16), cache) == []
    assert cache.is_file()

    def no_calibration(*_a, **_k):
        raise AssertionError("the kept calibration should have been used")

    monkeypatch.setattr(inv, "calibrate", no_calibration)
    assert inv.make_batch_invariant(tiny_llama().model.to(torch.bfloat16), cache) == []


@torch.inference_mode()
def test_without_native_bf16_nothing_is_calibrated_and_the_row_kernel_serves_bf16(monkeypatch):
    """oneDNN emulates bf16 on such a CPU (slower than the row kernel), so it is not even tried."""
    def no_calibration(*_a, **_k):
        raise AssertionError("no oneDNN tiling should be measured without native bf16")

    monkeypatch.setattr(inv, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(inv, "calibrate", no_calibration)
    model = tiny_llama().model.to(torch.bfloat16)
    assert inv.make_batch_invariant(model) == []
    assert all(type(m) is not nn.Linear for m in model.modules())


@torch.inference_mode()
def test_the_row_kernel_reads_the_bias_the_model_holds_now():
    """The layer keeps the model's own parameters: a bias set after serving started is the one added."""
    w = torch.randn(20, 12)
    layer = inv.RowLinear(nn.Parameter(w, requires_grad=False), None)
    x = torch.randn(3, 12)
    layer.bias = nn.Parameter(torch.arange(20.0), requires_grad=False)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
