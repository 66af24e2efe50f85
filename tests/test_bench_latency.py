"""scripts/bench_latency.py's arithmetic: which bytes a decoded token reads, and which measured rows each goal of the
decode-speed issue compares (nothing here is timed)."""

from __future__ import annotations

import argparse

import pytest

from prompt_core.quantize import quantize_linears
from tests.server.engine.test_architectures import build


@pytest.fixture(scope="module")
def bench_latency():
    from scripts import bench_latency
    return bench_latency


def every_tensor(model) -> dict[int, int]:
    return {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}


def test_weight_bytes_counts_a_tied_head_once_and_an_untied_embedding_not_at_all(bench_latency):
    """A token reads every weight once; of the input embedding it reads one row, so that counts only when it is
    also the LM head."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.server.engine.test_architectures import LLAMA_LIKE
    tied = AutoModelForCausalLM.from_config(LlamaConfig(tie_word_embeddings=True, **LLAMA_LIKE))
    assert bench_latency.weight_bytes(tied) == sum(every_tensor(tied).values())      # the shared matrix once
    untied = build("llama").model
    embedding = untied.get_input_embeddings().weight
    assert bench_latency.weight_bytes(untied) == sum(every_tensor(untied).values()) - embedding.numel() * 4
    quantize_linears(tied, "int8")             # the head becomes an int8 copy: the float embedding is not read
    embedding = tied.get_input_embeddings().weight
    assert bench_latency.weight_bytes(tied) == sum(every_tensor(tied).values()) - embedding.numel() * 4


def rows(**by_system: tuple[float, float, float]) -> dict[str, dict[int, float]]:
    """Decode tokens/s at batch 1, 16 and 64 per system (systems named as bench_latency names them)."""
    return {name: dict(zip((1, 16, 64), speeds)) for name, speeds in by_system.items()}


@pytest.mark.parametrize("native", [True, False])
def test_goals_compare_the_default_setting_the_fastest_setting_and_each_server(bench_latency, native, monkeypatch):
    monkeypatch.setattr(bench_latency, "cpu_has_native_bf16", lambda: native)
    results = rows(**{"engine": (10, 100, 200), "engine bfloat16": (12, 150, 400), "engine int8": (20, 250, 500),
                      "engine int4": (40, 200, 230), "engine compiled": (30, 120, 190),
                      "http": (10, 90, 180), "llama.cpp F32": (20, 150, 200),
                      "llama.cpp Q4_1": (80, 140, 150)})
    bounds = {"engine": 50.0, "engine bfloat16": 100.0, "engine int8": 200.0, "engine int4": 400.0,
              "engine compiled": 50.0}
    args = argparse.Namespace(device="cpu", dtype="float32", batches=[1, 16, 64])
    goals = {name: (ratio, target) for name, ratio, target in bench_latency.goal_ratios(results, bounds, args)}
    assert goals["batch 1 vs bandwidth bound (engine)"] == (10 / 50, 0.5)
    # the fp32 goal takes the fastest fp32 setting (compiled or not), never a bf16 or quantized row
    assert goals["batch 1 vs llama.cpp F32 (fastest fp32 setting: engine compiled)"] == (30 / 20, 1.0)
    default = "engine bfloat16" if native else "engine"
    assert goals[f"batch 64 vs llama.cpp F32 (the default setting here: {default})"] == (
        (400 if native else 200) / 200, 1.5)
    assert goals["batch 64 vs llama.cpp F32 (fastest shipped setting: engine int8)"] == (500 / 200, 1.5)
    assert goals["batch 1 vs llama.cpp Q4_1 (fastest shipped setting: engine int4)"] == (40 / 80, 0.5)
    assert [goals[f"HTTP vs in-process (engine), batch {b}"][0] for b in (1, 16, 64)] == [1.0, 0.9, 0.9]
    assert not any("(engine int8), batch" in name for name in goals)   # no HTTP row measured for it
