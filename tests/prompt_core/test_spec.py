"""prompt_core/spec.py: template parsing, prompt kinds and their checks, labels. Pure Python, no model."""

from __future__ import annotations

import pytest
import torch

from prompt_core.spec import (
    Label,
    PromptKind,
    PromptSpec,
    PromptTensors,
    TemplatePart,
    make_labels,
    parse_template,
    prefix_length,
)


def test_parse_template_splits_text_and_virtual_runs():
    assert parse_template("<v:4> Review: {input} <v:2> Sentiment:") == [
        TemplatePart(virtual=4), TemplatePart(text=" Review: {input} "), TemplatePart(virtual=2),
        TemplatePart(text=" Sentiment:")]


def test_parse_template_plain_input_is_one_text_part():
    assert parse_template("{input}") == [TemplatePart(text="{input}")]


def test_parse_template_adjacent_markers_stay_separate_runs():
    assert parse_template("<v:1><v:2>{input}") == [TemplatePart(virtual=1), TemplatePart(virtual=2),
                                                  TemplatePart(text="{input}")]


@pytest.mark.parametrize("template", ["no slot", "{input} and {input}"])
def test_parse_template_needs_exactly_one_input_slot(template):
    with pytest.raises(ValueError, match="exactly one"):
        parse_template(template)


def test_parse_template_refuses_an_empty_virtual_run():
    with pytest.raises(ValueError, match="at least one token"):
        parse_template("<v:0>{input}")


def test_prompt_kind_parse_accepts_dashes_and_case():
    assert PromptKind.parse("P-Tuning") is PromptKind.P_TUNING
    with pytest.raises(ValueError, match="unknown prompt kind"):
        PromptKind.parse("lora")


def test_spec_takes_the_kind_as_a_string():
    assert PromptSpec("prefix-tuning", 3).kind is PromptKind.PREFIX_TUNING


def test_soft_prompts_without_markers_prepend_their_virtual_tokens():
    for kind in (PromptKind.PROMPT_TUNING, PromptKind.P_TUNING):
        assert PromptSpec(kind, 3, "Q: {input}").parts == [TemplatePart(virtual=3), TemplatePart(text="Q: {input}")]


def test_p_tuning_markers_place_the_virtual_tokens():
    spec = PromptSpec(PromptKind.P_TUNING, 3, "<v:1>Q: {input}<v:2>")
    assert spec.parts == [TemplatePart(virtual=1), TemplatePart(text="Q: {input}"), TemplatePart(virtual=2)]


def test_hard_and_prefix_prompts_put_nothing_virtual_in_the_input():
    assert PromptSpec(PromptKind.HARD, 0, "Q: {input}").parts == [TemplatePart(text="Q: {input}")]
    assert PromptSpec(PromptKind.PREFIX_TUNING, 5).parts == [TemplatePart(text="{input}")]


@pytest.mark.parametrize("kind, n, template, message", [
    (PromptKind.HARD, 2, "{input}", "no virtual tokens"),
    (PromptKind.PROMPT_TUNING, 0, "{input}", "at least one virtual token"),
    (PromptKind.PROMPT_TUNING, 2, "<v:2>{input}", "p_tuning only"),
    (PromptKind.P_TUNING, 3, "<v:2>{input}", "places 2 virtual tokens but the prompt has 3"),
])
def test_spec_refuses_inconsistent_kinds_and_counts(kind, n, template, message):
    with pytest.raises(ValueError, match=message):
        PromptSpec(kind, n, template)


def test_prefix_length_is_the_token_count_for_prefix_tuning_only():
    assert prefix_length(PromptSpec(PromptKind.PREFIX_TUNING, 5)) == 5
    assert prefix_length(PromptSpec(PromptKind.PROMPT_TUNING, 5)) == 0
    assert prefix_length(PromptSpec(PromptKind.HARD)) == 0


def test_make_labels_from_a_list_adds_a_leading_space():
    assert make_labels(["pos", "neg"]) == (Label("pos", " pos"), Label("neg", " neg"))


def test_make_labels_from_a_map_keeps_the_verbalizers():
    assert make_labels({"pos": " positive"}) == (Label("pos", " positive"),)
    assert make_labels(None) == () and make_labels([]) == ()


def test_make_labels_refuses_duplicates_and_empty_verbalizers():
    with pytest.raises(ValueError, match="unique"):
        make_labels(["a", "a"])
    with pytest.raises(ValueError, match="non-empty verbalizer"):
        make_labels({"a": ""})


def test_a_spec_with_labels_is_a_classifier():
    assert PromptSpec(PromptKind.HARD, labels=make_labels(["a", "b"])).is_classifier
    assert not PromptSpec(PromptKind.HARD).is_classifier


def test_prompt_tensors_count_bytes_of_both_parts():
    t = PromptTensors(virtual=torch.zeros(3, 4), prefix=torch.zeros(2, 2, 1, 3, 4, dtype=torch.float16))
    assert t.nbytes == 3 * 4 * 4 + 2 * 2 * 1 * 3 * 4 * 2
    assert PromptTensors().nbytes == 0


def test_prompt_tensors_to_casts_and_keeps_missing_parts_missing():
    moved = PromptTensors(virtual=torch.ones(2, 3)).to("cpu", torch.bfloat16)
    assert moved.virtual.dtype is torch.bfloat16 and moved.prefix is None
