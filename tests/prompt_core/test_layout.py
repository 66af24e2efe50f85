"""prompt_core/layout.py: one row's token layout (plan_row, RowPlan). A character tokenizer stands in for a real
one, so every expected id can be worked out by hand: a character's id is its code point, BOS is 1."""

from __future__ import annotations

import pytest

from prompt_core.layout import RowPlan, plan_row
from prompt_core.spec import PromptKind, PromptSpec, make_labels

BOS = 1


class CharTokenizer:
    """One token per character (its code point); with special tokens, a BOS in front, as Llama's tokenizer does."""

    def __init__(self, bos: bool = True):
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) for c in text]
        return {"input_ids": ([BOS] if self.bos and add_special_tokens else []) + ids}


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


TOK = CharTokenizer()


def test_hard_prompt_is_the_filled_in_template_after_bos():
    plan = plan_row(PromptSpec(PromptKind.HARD, 0, "Q:{input}!"), TOK, "ab")
    assert plan.ids == [BOS] + chars("Q:ab!")
    assert plan.virt == [-1] * 6
    assert plan.prefix == 0 and plan.labels == [] and plan.input_span is None


def test_a_tokenizer_without_specials_adds_nothing():
    assert plan_row(PromptSpec(PromptKind.HARD, 0, "Q:{input}"), CharTokenizer(bos=False), "a").ids == chars("Q:a")


def test_prompt_tuning_puts_virtual_tokens_before_the_bos():
    """As PEFT does: the virtual tokens come first, the tokenizer's specials go in front of the first text."""
    plan = plan_row(PromptSpec(PromptKind.PROMPT_TUNING, 2), TOK, "ab")
    assert plan.ids == [0, 0, BOS, *chars("ab")]
    assert plan.virt == [0, 1, -1, -1, -1]


def test_p_tuning_markers_number_the_virtual_tokens_in_order():
    plan = plan_row(PromptSpec(PromptKind.P_TUNING, 3, "<v:1>Q{input}<v:2>"), TOK, "a")
    assert plan.ids == [0, BOS, *chars("Qa"), 0, 0]
    assert plan.virt == [0, -1, -1, -1, 1, 2]


def test_prefix_tuning_has_prefix_slots_and_no_virtual_tokens():
    plan = plan_row(PromptSpec(PromptKind.PREFIX_TUNING, 4), TOK, "ab")
    assert plan.ids == [BOS, *chars("ab")] and plan.virt == [-1, -1, -1]
    assert plan.prefix == 4


def test_input_ids_go_between_the_template_pieces_as_given():
    plan = plan_row(PromptSpec(PromptKind.HARD, 0, "Q: {input}!"), TOK, "", input_ids=[500, 501])
    assert plan.ids == [BOS, *chars("Q: "), 500, 501, *chars("!")]
    assert plan.input_span == (4, 6)
    assert plan.ids[slice(*plan.input_span)] == [500, 501]


def test_input_ids_at_the_start_get_the_bos_in_front_of_them():
    plan = plan_row(PromptSpec(PromptKind.HARD, 0, "{input}!"), TOK, "", input_ids=[500])
    assert plan.ids == [BOS, 500, *chars("!")]
    assert plan.input_span == (1, 2)  # the span holds the caller's tokens only, not the added BOS


def test_input_ids_that_start_with_the_bos_are_not_given_a_second_one():
    plan = plan_row(PromptSpec(PromptKind.HARD, 0, "{input}!"), TOK, "", input_ids=[BOS, 500])
    assert plan.ids == [BOS, 500, *chars("!")]
    assert plan.input_span == (0, 2)


def test_separate_input_tokenizes_the_text_alone():
    plan = plan_row(PromptSpec(PromptKind.PROMPT_TUNING, 1, "Q{input}"), TOK, "ab", separate_input=True)
    assert plan.ids == [0, BOS, *chars("Qab")]
    assert plan.virt == [0, -1, -1, -1, -1]
    assert plan.input_span == (3, 5)


def test_labels_are_the_verbalizers_tokens():
    spec = PromptSpec(PromptKind.HARD, 0, "{input}", make_labels({"yes": " y", "no": "no"}))
    plan = plan_row(spec, TOK, "a", with_labels=True)
    assert plan.labels == [chars(" y"), chars("no")]
    assert plan_row(spec, TOK, "a").labels == []  # only when asked for


def test_given_label_ids_are_used_as_they_are():
    spec = PromptSpec(PromptKind.HARD, 0, "{input}", make_labels(["a", "b"]))
    assert plan_row(spec, TOK, "x", with_labels=True, label_ids=[[7], [8, 9]]).labels == [[7], [8, 9]]


def test_classification_needs_labels_with_tokens():
    with pytest.raises(ValueError, match="labels"):
        plan_row(PromptSpec(PromptKind.HARD), TOK, "a", with_labels=True)
    spec = PromptSpec(PromptKind.HARD, 0, "{input}", make_labels(["a", "b"]))
    with pytest.raises(ValueError, match="labels"):
        plan_row(spec, TOK, "x", with_labels=True, label_ids=[[7], []])


def test_a_row_with_no_tokens_at_all_is_refused():
    with pytest.raises(ValueError, match="no tokens"):
        plan_row(PromptSpec(PromptKind.HARD), CharTokenizer(bos=False), "")


def test_label_queries_are_all_but_the_last_token_of_each_verbalizer():
    """A verbalizer's first token is scored from the prompt's last query; each later one needs a query of its own."""
    plan = RowPlan(ids=[5, 6], virt=[-1, -1], labels=[[1, 2, 3], [4]])
    assert plan.num_tokens == 2
    assert plan.num_label_queries == 2
    assert plan.num_queries == 4
