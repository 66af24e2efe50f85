"""PEFT interop: import a real PEFT adapter and serve it with logits equal to PEFT's forward; export ours and PEFT
loads it with logits equal to ours. On a tiny GQA Llama (all methods) and on the default model."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from prompt_core.fingerprint import fingerprint
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors
from prompt_store.errors import InvalidPrompt
from prompt_store.peft_io import export_peft, import_peft, prefix_from_peft, prefix_to_peft

from .helpers import KIND_OF, make_peft_config, our_logits, peft_logits, real_ids

METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning", "prefix_projection"]
TEXT = "The movie was great, I loved every minute of it"
TOL = 1e-4


def _roundtrip(base, tokenizer, method: str, tmp_path, T: int = 5, template: str | None = None):
    """PEFT adapter -> import -> our logits == PEFT's; export -> PEFT loads -> PEFT's logits == ours.

    PEFT's prompt-learning wrappers leave the base model's weights and modules alone, so one base is shared
    (copying the default model per wrapper cost seconds each)."""
    fp = fingerprint(base)
    torch.manual_seed(1234)
    trained = peft.get_peft_model(base, make_peft_config(method, T)).eval()
    if method == "prompt_tuning":  # PEFT's random init is tiny-scaled for some versions: make it matter
        with torch.no_grad():
            emb = trained.prompt_encoder["default"].embedding.weight
            emb.copy_(torch.randn_like(emb) * 0.5)
    src = tmp_path / f"peft-{method}"
    trained.save_pretrained(src)
    spec, tensors, cfg = import_peft(src, fp)
    assert spec.kind is KIND_OF[method] and spec.num_virtual_tokens == T
    assert cfg["peft_type"] in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
    if template is not None:
        spec = PromptSpec(spec.kind, T, template, spec.labels)

    ours = our_logits(base, tokenizer, spec, tensors, TEXT)
    ids = real_ids(spec, tokenizer, TEXT)
    # the oracle is the saved adapter as PEFT itself loads it (the trained model recomputes its encoder on the
    # fly, which differs from the saved output by float rounding only)
    oracle = peft.PeftModel.from_pretrained(base, src).eval()
    ref = peft_logits(oracle, ids)
    assert (peft_logits(trained, ids) - ref).abs().max().item() < 1e-2
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL
    # the prompt matters: without it the logits differ (so equality above is not vacuous)
    plain = our_logits(base, tokenizer, PromptSpec(PromptKind.HARD, 0, spec.template), None, TEXT)
    assert (ours[-1] - plain[-1]).abs().max().item() > 1e-3

    out = tmp_path / f"export-{method}"
    export_peft(out, spec, tensors, fp, base_model="tiny")
    assert not list(out.glob("*.bin"))
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    ref2 = peft_logits(loaded, ids)
    assert (ours - ref2).abs().max().item() < TOL
    # re-import gives back the very same tensors and the template
    spec2, tensors2, _ = import_peft(out, fp)
    assert spec2 == spec
    for a, b in ((tensors.virtual, tensors2.virtual), (tensors.prefix, tensors2.prefix)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_gqa_roundtrip(tiny, tokenizer, method, tmp_path):
    _roundtrip(tiny, tokenizer, method, tmp_path)


def test_tiny_roundtrip_with_template(tiny, tokenizer, tmp_path):
    _roundtrip(tiny, tokenizer, "prompt_tuning", tmp_path, template="Review: {input}\nSentiment:")


def test_prefix_layout_matches_peft_columns():
    """Column ((2*l + s)*H + h)*Dh + d of PEFT's flat row t is our [l, s, h, t, d]."""
    L, H, T, Dh = 3, 2, 4, 5
    flat = torch.arange(T * L * 2 * H * Dh, dtype=torch.float32).reshape(T, -1)
    ours = prefix_from_peft(flat, L, H, Dh)
    assert ours.shape == (L, 2, H, T, Dh)
    for layer, s, h, t, d in [(0, 0, 0, 0, 0), (2, 1, 1, 3, 4), (1, 0, 1, 2, 3), (2, 0, 0, 1, 2)]:
        assert ours[layer, s, h, t, d] == flat[t, ((2 * layer + s) * H + h) * Dh + d]
    assert torch.equal(prefix_to_peft(ours), flat)


@pytest.fixture(scope="module")
def default_model():
    from prompt_core.model import load_model
    return load_model(device="cpu", dtype="float32")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning"])
def test_default_model_roundtrip(default_model, method, tmp_path):
    _roundtrip(default_model.model, default_model.tokenizer, method, tmp_path, T=4)


def test_default_model_prefix_is_gqa(default_model, tmp_path):
    """SmolLM2-135M: 30 layers, 3 KV heads of 64 -> PEFT rows of 30*2*192 = 11520 columns."""
    fp = fingerprint(default_model.model)
    pm = peft.get_peft_model(default_model.model, make_peft_config("prefix_tuning", 2))
    pm.save_pretrained(tmp_path / "a")
    flat = load_file(tmp_path / "a" / "adapter_model.safetensors")["prompt_embeddings"]
    assert flat.shape == (2, fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim)
    _, tensors, _ = import_peft(tmp_path / "a", fp)
    assert tensors.prefix.shape == (fp.num_layers, 2, fp.num_kv_heads, 2, fp.head_dim)


# ---------------------------------------------------------------- refusals


def _adapter(tmp_path, tiny, method="prompt_tuning", T=3):
    pm = peft.get_peft_model(tiny, make_peft_config(method, T))
    pm.save_pretrained(tmp_path / "ad")
    return tmp_path / "ad"


def test_refuses_pickle_adapter(tmp_path, tiny, tiny_fp):
    d = _adapter(tmp_path, tiny)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InvalidPrompt, match="pickle.*arbitrary code"):
        import_peft(d, tiny_fp)


def test_refuses_wrong_shape_naming_dims(tmp_path, tiny, tiny_fp):
    d = _adapter(tmp_path, tiny, "prefix_tuning", T=3)
    save_file({"prompt_embeddings": torch.zeros(3, 100)}, d / "adapter_model.safetensors")
    with pytest.raises(InvalidPrompt, match=r"expected shape \[3, 128\].*found \[3, 100\]"):
        import_peft(d, tiny_fp)
    d2 = _adapter(tmp_path / "b", tiny, "prompt_tuning", T=3)
    save_file({"prompt_embeddings": torch.zeros(3, 65)}, d2 / "adapter_model.safetensors")
    with pytest.raises(InvalidPrompt, match=r"\[3, 64\].*found \[3, 65\]"):
        import_peft(d2, tiny_fp)


def test_refuses_unknown_peft_type_and_seq_cls(tmp_path, tiny, tiny_fp):
    d = _adapter(tmp_path, tiny)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(InvalidPrompt, match="peft_type expected one of.*found 'LORA'"):
        import_peft(d, tiny_fp)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "SEQ_CLS"}))
    with pytest.raises(InvalidPrompt, match="task_type expected CAUSAL_LM.*found SEQ_CLS"):
        import_peft(d, tiny_fp)


def test_refuses_other_model_layers(tmp_path, tiny, tiny_fp):
    d = _adapter(tmp_path, tiny, "prefix_tuning")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "num_layers": 30}))
    with pytest.raises(InvalidPrompt, match="num_layers expected 2.*found 30"):
        import_peft(d, tiny_fp)


def test_export_refuses_hard_and_anchored_ptuning(tmp_path, tiny_fp):
    with pytest.raises(InvalidPrompt, match="hard prompt"):
        export_peft(tmp_path / "h", PromptSpec(PromptKind.HARD, 0, "Q: {input}"), PromptTensors(), tiny_fp)
    spec = PromptSpec(PromptKind.P_TUNING, 4, "<v:2> Review: {input} <v:2> Sentiment:")
    with pytest.raises(InvalidPrompt, match="PEFT cannot express"):
        export_peft(tmp_path / "p", spec, PromptTensors(virtual=torch.zeros(4, 64)), tiny_fp)
    assert not (tmp_path / "p").exists()
    # markers all at the front are fine
    front = PromptSpec(PromptKind.P_TUNING, 4, "<v:2><v:2> Review: {input}")
    export_peft(tmp_path / "f", front, PromptTensors(virtual=torch.zeros(4, 64)), tiny_fp)
    assert load_file(tmp_path / "f" / "adapter_model.safetensors")["prompt_embeddings"].shape == (4, 64)
