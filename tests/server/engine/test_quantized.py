"""Quantized serving (`--quantize int8 | int4`): the layers compute what their quantized weights say, a row's
result does not depend on its batch, and the engine on a quantized model still equals that model's own forward on
each request alone, for every prompt kind. (How close a quantized model is to the float one is a quality figure,
measured in docs/benchmarks.md; what is tested here is that batching adds no error of its own.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prompt_core.arch import UnsupportedModel
from prompt_core.model import LoadedModel, load_model, pick_dtype
from prompt_core.quantize import (
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    check_quantization,
    quantization_of,
    quantize_linears,
)
from prompt_core.spec import PromptKind, PromptSpec
from server.engine.request import EngineRequest, SamplingParams
from server.engine.self_check import QUANTIZED_TOLERANCE, self_check
from tests.helpers import new_engine, prompt_ref, run
from tests.server.engine.test_architectures import build, mixed_requests, reference_logits

CPU = torch.device("cpu")


def linear(inp: int, out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


# ------------------------------------------------------------------ the layers


def test_int8_layer_is_its_integer_arithmetic():
    """y = (round(x / sx) @ q^T) * sx * sw + b, with sx per row and sw per output channel: recomputed in float64."""
    lin = linear(96, 40)
    q8 = Int8Linear(lin)
    x = torch.randn(5, 96)
    sx = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / sx)
    want = (xq.double() @ q8.qweight_t.double()) * sx.double() * q8.scale.double() + lin.bias.double()
    got = q8(x)
    assert got.dtype == torch.float32 and got.shape == (5, 40)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    # and it is an approximation of the float layer, to about one rounding step of each side
    assert (got - lin(x)).abs().max() < 0.02 * lin(x).abs().max()


def test_int8_rows_do_not_depend_on_their_batch():
    q8 = Int8Linear(linear(64, 48))
    x = torch.randn(9, 64) * torch.logspace(-2, 2, 9)[:, None]   # rows of very different scales
    together = q8(x)
    alone = torch.cat([q8(x[i:i + 1]) for i in range(9)])
    assert torch.equal(together, alone)


def test_int8_keeps_leading_dimensions_and_dtype():
    q8 = Int8Linear(linear(32, 16, bias=False))
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    y = q8(x)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16


def test_int4_layer_is_its_dequantized_weight():
    """Per group of INT4_GROUP inputs, 16 levels between the group's min and max: the kernel's product equals a bf16
    activation times that dequantized weight, and the weight is within half a level of the float one."""
    lin = linear(2 * INT4_GROUP, 48)
    q4 = Int4Linear(lin)
    w = q4.dequantized()                                                         # [out, in]
    g = lin.weight.detach().reshape(48, 2, INT4_GROUP)
    level = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(INT4_GROUP, 1)    # [out, in]
    assert ((w - lin.weight.detach()).abs() <= 0.5 * level + 2e-2 * level.max()).all()   # bf16 scale, zero
    x = torch.randn(4, 2 * INT4_GROUP, dtype=torch.bfloat16)
    want = x.float() @ w.t() + lin.bias.detach()
    got = q4(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 2e-2 * want.abs().max()


def test_int4_rows_do_not_depend_on_their_batch():
    q4 = Int4Linear(linear(2 * INT4_GROUP, 64, bias=False))
    x = torch.randn(7, 2 * INT4_GROUP, dtype=torch.bfloat16)
    together = q4(x)
    alone = torch.cat([q4(x[i:i + 1]) for i in range(7)])
    assert torch.equal(together, alone)


def test_quantize_linears_replaces_every_linear_and_unties_the_head():
    loaded = build("llama")
    model = loaded.model
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    embedding = model.get_input_embeddings().weight.clone()
    assert quantize_linears(model, "int8") == len(linears) and "lm_head" in linears
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8Linear) and quantization_of(model) == "int8"
    assert torch.equal(model.get_input_embeddings().weight, embedding)   # soft prompts enter as before
    assert quantization_of(build("llama").model) == "none"


def test_check_quantization_reasons():
    model = build("llama").model
    assert check_quantization("none", model, CPU) is None
    assert check_quantization("int8", model, CPU) is None
    assert "unknown quantization" in check_quantization("int3", model, CPU)
    assert "CPU kernels" in check_quantization("int8", model, torch.device("cuda"))
    odd = nn.Sequential(nn.Linear(INT4_GROUP + 8, 16))
    assert "divisible by 32" in check_quantization("int4", odd, CPU)


def test_int4_multiplies_in_bf16():
    assert pick_dtype("auto", CPU, "int4") == torch.bfloat16
    assert pick_dtype(None, CPU, "int8", serving=True) == torch.float32
    with pytest.raises(UnsupportedModel, match="int4 multiplies in bfloat16"):
        pick_dtype("float32", CPU, "int4")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_serves_bf16_only_where_the_cpu_has_it(native, monkeypatch):
    """Serving picks bf16 on a CPU with native bf16 and fp32 on one without; training stays fp32 on any CPU; a
    named dtype always wins."""
    import prompt_core.model as model_mod
    monkeypatch.setattr(model_mod, "cpu_has_native_bf16", lambda: native)
    assert pick_dtype("auto", CPU, serving=True) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype(None, CPU) == torch.float32
    assert pick_dtype("float32", CPU, serving=True) == torch.float32
    assert pick_dtype("auto", torch.device("cuda"), serving=True) == torch.bfloat16


def test_load_model_refuses_what_it_cannot_quantize(tmp_path):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers import tokenizer
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="divisible by 32"):
        load_model(str(tmp_path), device="cpu", quantize="int4")
    loaded = load_model(str(tmp_path), device="cpu", quantize="int8")
    assert loaded.quantization == "int8" and quantization_of(loaded.model) == "int8"


# ------------------------------------------------------------------ served by the engine


def quantized(name: str, mode: str) -> LoadedModel:
    loaded = build(name)
    dtype = torch.bfloat16 if mode == "int4" else torch.float32
    loaded.model.to(dtype)
    quantize_linears(loaded.model, mode)
    return LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, source=name, device=CPU, dtype=dtype)


CASES = [("int8", "llama"), ("int8", "gemma2-window-softcap"), ("int8", "falcon-multi-query"),
         ("int4", "llama"), ("int4", "qwen2-mixed-window")]


@pytest.mark.parametrize("mode,name", CASES)
def test_quantized_mixed_batch_equals_the_quantized_models_own_forward(mode, name):
    """Every kind, generate and classify, batched: each generated step's logits equal the quantized model's own
    forward on that request alone, and every request's greedy tokens equal the engine's on that request alone."""
    loaded = quantized(name, mode)
    requests = mixed_requests(loaded)
    engine = new_engine(loaded)
    seqs = {r.request_id: engine.add_request(r) for r in requests}
    plans = {rid: s.prefill_plan for rid, s in seqs.items()}
    outs = run(engine, [])
    worst = 0.0
    for req in requests:
        assert outs[req.request_id].error is None
        if req.mode == "classify":
            continue
        steps = engine.runner.trace[req.request_id]
        generated = [int(s.argmax()) for s in steps]
        with torch.inference_mode():
            full = reference_logits(loaded, plans[req.request_id], req.prompt.load(), generated[:-1]).float()
        n = plans[req.request_id].num_tokens
        for k, mine in enumerate(steps):
            want = full[n - 1 + k]
            worst = max(worst, ((mine.float() - want).abs().max() / want.abs().max().clamp(min=1.0)).item())
    # int8: integer sums are exact, so only fp32 rounding elsewhere is left (1.8e-7 measured); int4 multiplies in
    # bf16, one bf16 step of the largest logit (3.9e-3 measured)
    assert worst < (1e-4 if mode == "int8" else QUANTIZED_TOLERANCE), worst
    for req in requests:
        alone = run(new_engine(loaded), [req])[req.request_id]
        assert alone.text == outs[req.request_id].text, req.request_id
        if req.mode == "classify":
            assert alone.label_probs == pytest.approx(outs[req.request_id].label_probs, abs=1e-3)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_start_up_check_passes_on_a_quantized_model_and_still_catches_a_wrong_window(mode, monkeypatch):
    """The looser limit of quantized layers still leaves a forgotten attention window far above it."""
    loaded = quantized("mistral-window", mode)
    assert self_check(new_engine(loaded), max_tokens=32) < QUANTIZED_TOLERANCE
    engine = new_engine(loaded)
    monkeypatch.setattr(engine.runner, "windows", [0] * len(engine.runner.windows))
    with pytest.raises(UnsupportedModel, match="differ from the model's own forward"):
        self_check(engine, max_tokens=32)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_are_batch_invariant_in_their_tiles(mode):
    """Each quantized layer runs its own kernel in measured row tiles: a request batched with others gets exactly
    the tokens and log-probabilities it gets alone."""
    loaded = quantized("mistral-window", mode)
    engine = new_engine(loaded, max_prefill_tokens=24)
    assert engine.batch_invariant, engine.invariance_gaps
    ref = prompt_ref("h@1", PromptSpec(PromptKind.HARD, 0, "{input}"), None)
    reqs = [EngineRequest(f"r{i}", ref, f"number {i} " * (3 + i), logprobs=1,
                          sampling=SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))
            for i in range(6)]
    together = run(engine, reqs)
    for r in reqs:
        alone = run(new_engine(loaded), [r])[r.request_id]
        got = together[r.request_id]
        assert [(x.token, x.logprob) for x in got.logprobs] == [(x.token, x.logprob) for x in alone.logprobs]
