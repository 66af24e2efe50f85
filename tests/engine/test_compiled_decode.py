"""The compiled decode step (`--compile`): the same tokens as the eager step for every prompt kind, batched and
alone, logits that equal the model's own forward, and no compiling after warm-up however the batch and the cache
change (a step no graph covers runs eagerly, and is counted)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prompt_core.arch import UnsupportedModel
from prompt_core.model import load_model
from server.config import Settings
from server.engine.compiled_decode import CompiledDecode, RowDot, compiled_graphs, decode_logits
from server.engine.request import EngineRequest, SamplingParams
from tests.engine.test_architectures import build, mixed_requests, reference_logits, saved
from tests.helpers import greedy, new_engine, run

# a plain model, and one with interleaved sliding windows (a dict of masks) and logit softcapping
ARCHS = ["llama", "gemma2-window-softcap"]


@pytest.fixture(scope="module", params=ARCHS)
def compiled(request):
    """(loaded model, compiled engine warmed up, graphs compiled in this process after warm-up)."""
    loaded = build(request.param)
    engine = new_engine(loaded, compile_decode=True)
    before = compiled_graphs()
    seconds = engine.warm_up()
    assert seconds > 0 and engine.runner.compiled.frozen
    assert compiled_graphs() - before == 2          # one graph for a single row, one for every larger batch
    return loaded, engine, compiled_graphs()


def test_row_dot_is_the_linear_layer():
    torch.manual_seed(0)
    w, b = torch.randn(40, 96), torch.randn(40)
    one, many = torch.randn(1, 1, 96), torch.randn(3, 1, 96)
    with RowDot():
        got_one, got_many = F.linear(one, w, b), F.linear(many, w, b)
    assert got_one.shape == (1, 1, 40)
    assert torch.allclose(got_one, F.linear(one, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(got_many, F.linear(many, w, b))     # more than one row: the model's own matmul
    w16, one16 = w.bfloat16(), one.bfloat16()
    with RowDot():
        got16 = F.linear(one16, w16)
    assert torch.equal(got16, F.linear(one16, w16))        # bf16 weights: the model's own matmul too


def test_compiled_step_equals_eager_and_the_models_own_forward_for_every_kind(compiled):
    loaded, engine, graphs = compiled
    requests = mixed_requests(loaded)
    plans = {r.request_id: engine.add_request(r).prefill_plan for r in requests}
    outs = run(engine, [])
    eager = new_engine(loaded)
    want = run(eager, requests)
    worst = 0.0
    for req in requests:
        assert outs[req.request_id].error is None
        assert outs[req.request_id].text == want[req.request_id].text, req.request_id
        if req.mode == "classify":
            continue
        steps = engine.runner.trace[req.request_id]
        generated = [int(s.argmax()) for s in steps]
        full = reference_logits(loaded, plans[req.request_id], req.prompt.load(), generated[:-1]).float()
        n = plans[req.request_id].num_tokens
        for k, mine in enumerate(steps):
            ref = full[n - 1 + k]
            worst = max(worst, ((mine - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item())
    assert worst < 1e-5, worst
    for req in requests:   # alone: the single-row graph
        assert run(engine, [req])[req.request_id].text == want[req.request_id].text, req.request_id
    assert compiled_graphs() == graphs and engine.runner.compiled.eager_steps == 0


def test_nothing_compiles_as_the_batch_and_the_cache_grow(compiled):
    """Ten rows (the cache starts with 8) running past 256 slots (its first length): the warm-up graphs serve
    every step, and the tokens are the eager engine's."""
    loaded, engine, graphs = compiled
    ref = mixed_requests(loaded)[0].prompt
    long = SamplingParams(max_new_tokens=300, temperature=0.0, ignore_eos=True)
    requests = [EngineRequest(f"long{i}", ref, "a b c " * (i + 1), sampling=long) for i in range(10)]
    tokens = {}
    for e in (engine, new_engine(loaded)):
        seqs = [e.add_request(r) for r in requests]
        run(e, [])
        tokens[e] = [s.output_ids for s in seqs]
    rows, slots = engine.runner.cache.capacity
    assert rows >= 10 and slots > 256
    assert all(len(t) == 300 for t in tokens[engine])
    assert tokens[engine] == list(tokens.values())[1]
    assert compiled_graphs() == graphs and engine.runner.compiled.eager_steps == 0


def test_a_step_no_graph_covers_runs_eagerly_and_is_counted(compiled):
    """With autograd on (the graphs were built in inference mode) the guards fail: the step must not compile on a
    user's request, and must still give the eager step's logits."""
    loaded, engine, graphs = compiled
    runner = engine.runner
    run(engine, [EngineRequest("warm", mixed_requests(loaded)[0].prompt, "hello there", sampling=greedy(2))])
    runner.cache.ensure(1, 16)
    state = [torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), torch.tensor([3])]
    with torch.no_grad():
        want = decode_logits(loaded.model, runner.cache, *state, 4, runner.dtype)
    before = runner.compiled.eager_steps
    with torch.enable_grad():
        got = runner.compiled(*state, 4)
    assert runner.compiled.eager_steps == before + 1
    assert compiled_graphs() == graphs
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padding_rows_and_length_change_no_real_row():
    """The GPU form pads the batch to a power of two and the attended length to a bucket (for CUDA graphs): the
    real rows' logits are those of the unpadded step (checked eagerly here; on a GPU the graph computes the same)."""
    loaded = build("llama")
    engine = new_engine(loaded)
    run(engine, [EngineRequest(f"r{i}", mixed_requests(loaded)[0].prompt, "x " * (2 + 3 * i), sampling=greedy(40))
                 for i in range(3)])
    runner = engine.runner
    stepper = CompiledDecode(loaded.model, runner.cache, runner.dtype, torch.device("cpu"))
    state = [torch.tensor([7, 8, 9]), torch.tensor([0, 0, 0]), torch.tensor([0, 0, 0]), torch.tensor([6, 9, 12])]
    with torch.inference_mode():
        want = decode_logits(loaded.model, runner.cache, *state, 13, runner.dtype)
        ids, prefix, tok_start, lengths, kv_len = stepper._padded(*state, 13)
        assert ids.shape == (4,) and kv_len == 256
        got = decode_logits(loaded.model, runner.cache, ids, prefix, tok_start, lengths, kv_len, runner.dtype)
    assert torch.allclose(got[:3], want, rtol=1e-5, atol=1e-5)


def test_compile_is_a_setting_and_is_refused_with_quantized_layers(tmp_path):
    assert Settings(compile=True).engine_config().compile_decode
    assert not Settings().engine_config().compile_decode
    quantized = load_model(saved("llama", tmp_path / "model"), device="cpu", quantize="int8")
    with pytest.raises(UnsupportedModel, match="--compile with --quantize int8"):
        new_engine(quantized, compile_decode=True)
