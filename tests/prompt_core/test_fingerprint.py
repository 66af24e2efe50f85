"""prompt_core/fingerprint.py: the record that ties a prompt to its base model, without loading a model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prompt_core.fingerprint import ModelFingerprint

FP = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, vocab_size=100, embedding_sha256="ab" * 32)


def test_round_trips_through_a_dict_and_ignores_extra_keys():
    assert ModelFingerprint.from_dict({**FP.to_dict(), "added_later": 1}) == FP


def test_a_dict_missing_fields_names_them():
    data = FP.to_dict()
    del data["head_dim"], data["vocab_size"]
    with pytest.raises(ValueError, match=r"\['head_dim', 'vocab_size'\]"):
        ModelFingerprint.from_dict(data)


def test_differences_say_expected_and_found():
    other = replace(FP, num_kv_heads=4, vocab_size=101)
    assert FP.differences(other) == ["num_kv_heads: expected 2, found 4", "vocab_size: expected 100, found 101"]
    assert FP.differences(FP) == []
