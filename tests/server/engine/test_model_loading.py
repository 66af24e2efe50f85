"""Loading the operator's model: the attention implementation each model needs, and a clear refusal (our own one
line, a non-zero exit, no traceback) for what the engine cannot serve exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, MambaConfig, MambaForCausalLM, MistralConfig, T5Config

from prompt_core.arch import UnsupportedModel, attn_implementation, kv_geometry
from prompt_core.model import load_model
from tests.helpers import tokenizer

ROOT = Path(__file__).resolve().parents[3]
SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def save(directory: Path, model) -> Path:
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    gemma2 = Gemma2Config(sliding_window=6, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                          final_logit_softcapping=3.0, **SMALL)
    mamba = MambaConfig(vocab_size=49152, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=2)
    t5 = root / "t5"
    T5Config(vocab_size=49152, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).save_pretrained(t5)
    return {
        "gemma2": save(root / "gemma2", AutoModelForCausalLM.from_config(gemma2)),
        "mistral": save(root / "mistral", AutoModelForCausalLM.from_config(MistralConfig(sliding_window=6, **SMALL))),
        "mamba": save(root / "mamba", MambaForCausalLM(mamba)),
        "t5": t5,
    }


def test_softcapped_attention_loads_eager_and_serves(models):
    loaded = load_model(str(models["gemma2"]), device="cpu", dtype="float32")
    assert loaded.model.config._attn_implementation == "eager"
    from server.engine.self_check import self_check
    from tests.helpers import new_engine
    assert self_check(new_engine(loaded), max_tokens=32) < 1e-4


def test_sdpa_model_loads_sdpa(models):
    assert load_model(str(models["mistral"]), device="cpu", dtype="float32").model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("requested, match", [("sdpa", "soft-caps its attention logits"),
                                              ("flash_attention_2", "only sdpa and eager")])
def test_an_inexact_attention_implementation_is_refused(models, requested, match):
    with pytest.raises(UnsupportedModel, match=match):
        load_model(str(models["gemma2"]), device="cpu", dtype="float32", attn_implementation=requested)


def test_attn_implementation_choice():
    assert attn_implementation(MistralConfig(), "auto") == "sdpa"
    assert attn_implementation(Gemma2Config(), "auto") == "eager"
    assert attn_implementation(MistralConfig(), "eager") == "eager"


@pytest.mark.parametrize("name, match", [("t5", "t5 is an encoder-decoder model"),
                                         ("mamba", "MambaForCausalLM has attention layers of kind linear_attention")])
def test_unservable_models_are_refused_on_load(models, name, match):
    with pytest.raises(UnsupportedModel, match=match):
        load_model(str(models[name]), device="cpu", dtype="float32")


def test_a_model_without_an_attention_cache_is_refused_by_its_forward(models):
    """Whatever its config says, the geometry probe sees that a state-space model caches no keys/values."""
    model = MambaForCausalLM.from_pretrained(models["mamba"])
    with pytest.raises(UnsupportedModel, match="MambaForCausalLM (keeps no attention key/value cache|does not run)"):
        kv_geometry(model)


def test_a_missing_model_is_one_line():
    with pytest.raises(UnsupportedModel, match="cannot read a model config"):
        load_model("/nonexistent/model-dir", device="cpu", dtype="float32")


@pytest.mark.parametrize("name", ["t5", "mamba"])
def test_server_refuses_to_start_with_one_line_and_exit_3(models, name, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(models[name]), "--store",
                           str(tmp_path / "store"), "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"python -m server: cannot serve model '{models[name]}'" in proc.stderr
    assert "Traceback" not in proc.stderr and "Application startup failed" not in proc.stderr
