"""prompt_core/arch.py: what the engine reads from a model's config (attention windows per layer type, the steps
after the LM head). Configs are plain namespaces: only the fields the functions read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prompt_core.arch import FULL, SLIDING, MaskLayout, UnsupportedModel, check_config, mask_layout, output_logits


def config(**fields) -> SimpleNamespace:
    return SimpleNamespace(architectures=["TestForCausalLM"], **fields)


def test_no_window_is_one_plain_mask():
    layout = mask_layout(config())
    assert layout == MaskLayout((None,), (None,)) and layout.plain and layout.smallest_window is None


def test_one_window_for_every_layer_is_one_windowed_mask():
    layout = mask_layout(config(sliding_window=8))
    assert layout == MaskLayout((None,), (8,)) and not layout.plain and layout.smallest_window == 8


def test_a_window_the_config_switches_off_is_ignored():
    assert mask_layout(config(sliding_window=8, use_sliding_window=False)).plain


def test_mixed_layer_types_get_one_mask_per_type():
    layout = mask_layout(config(sliding_window=4, layer_types=[SLIDING, FULL, SLIDING]))
    assert layout == MaskLayout((FULL, SLIDING), (None, 4)) and layout.smallest_window == 4


def test_layer_types_of_one_kind_need_no_dict():
    assert mask_layout(config(sliding_window=4, layer_types=[SLIDING, SLIDING])) == MaskLayout((None,), (4,))
    assert mask_layout(config(sliding_window=4, layer_types=[FULL])).plain


@pytest.mark.parametrize("fields, message", [
    ({"layer_types": ["chunked_attention"]}, "chunked_attention"),
    ({"layer_types": [SLIDING]}, "no sliding_window"),
])
def test_attention_kinds_the_masks_cannot_model_are_refused(fields, message):
    with pytest.raises(UnsupportedModel, match=message):
        mask_layout(config(**fields))


def test_encoder_decoder_models_are_refused_by_name():
    with pytest.raises(UnsupportedModel, match="TestForCausalLM is an encoder-decoder"):
        check_config(config(is_encoder_decoder=True))


def test_plain_logits_pass_through():
    x = torch.tensor([1.0, -2.0])
    assert torch.equal(output_logits(config(), x), x)


def test_logit_scale_and_scaling_multiply_and_divide():
    x = torch.tensor([1.0, -2.0])
    assert output_logits(config(logit_scale=0.5), x).tolist() == [0.5, -1.0]      # Cohere
    assert output_logits(config(logits_scaling=4.0), x).tolist() == [0.25, -0.5]  # Granite


def test_softcapping_bounds_logits_by_the_cap():
    out = output_logits(config(final_logit_softcapping=2.0), torch.tensor([0.0, 1e6, -1e6]))  # Gemma 2
    assert out.tolist() == [0.0, 2.0, -2.0]
