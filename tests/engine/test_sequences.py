"""SequenceBuilder alone (a real tokenizer, no model): the task tokens cached per prompt key, and what they give a
sequence (its shared head, its label tokens)."""

from __future__ import annotations

import pytest

from prompt_core.spec import PromptKind, PromptSpec, make_labels
from server.engine.config import EngineConfig
from server.engine.request import EngineRequest, InvalidRequest, PromptRef
from server.engine.sequences import SequenceBuilder, task_tokens
from server.engine.tokenizer import SharedTokenizer
from tests.helpers import tokenizer

SPEC = PromptSpec(PromptKind.PROMPT_TUNING, 4, "Review: {input}\nSentiment:", labels=make_labels(["good", "bad"]))
REF = PromptRef("review@1", SPEC)


def encode(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def builder(**limits) -> SequenceBuilder:
    return SequenceBuilder(EngineConfig(**limits), SharedTokenizer(tokenizer()), grammars=None,
                           vocab_size=49152, logits_size=49152, max_positions=512)


def test_task_tokens_are_the_head_and_the_verbalizers():
    tokens = task_tokens(SPEC, SharedTokenizer(tokenizer()))
    # the virtual tokens, then the text before the input less its last token (BPE may merge it with the input)
    assert tokens.head_len == 4 + len(encode("Review: ")) - 1
    assert tokens.labels == [encode(" good"), encode(" bad")]
    assert task_tokens(PromptSpec(PromptKind.HARD, 0, "{input} is"), SharedTokenizer(tokenizer())).head_len == 0


def test_a_classify_sequence_scores_the_cached_label_tokens():
    b = builder()
    seq = b.make(EngineRequest("c", REF, "a fine film", mode="classify"))
    assert seq.plan.labels == [encode(" good"), encode(" bad")]
    assert seq.head_len == b.head_len(REF) == 4 + len(encode("Review: ")) - 1
    assert b.task(REF) is b.task(PromptRef("review@1", SPEC))  # tokenized once per prompt key
    assert b.task(PromptRef("review@2", SPEC)) is not b.task(REF)


def test_the_cache_starts_over_when_full(monkeypatch):
    b = builder()
    monkeypatch.setattr(SequenceBuilder, "MAX_TASKS", 2)
    for v in range(3):
        b.task(PromptRef(f"review@{v}", SPEC))
    assert list(b._tasks) == ["review@2"]


def test_choices_of_one_prompt_share_all_of_it_but_its_last_token():
    """One of n choices (share_prompt) takes its whole prompt but the last token from the head cache; without a
    head cache it keeps the task's head."""
    req = EngineRequest("n", REF, "a fine film", share_prompt=True)
    shared = builder().make(req)
    assert shared.head_len == shared.plan.num_tokens - 1 > builder().head_len(REF)
    assert builder(head_cache_bytes=0).make(req).head_len == builder().head_len(REF)


def test_limits_are_checked_before_tokenizing():
    with pytest.raises(InvalidRequest, match="no labels"):
        builder().make(EngineRequest("x", PromptRef("h@1", PromptSpec(PromptKind.HARD)), "hi", mode="classify"))
    with pytest.raises(InvalidRequest, match="between 0 and 2"):
        builder(max_logprobs=2).make(EngineRequest("x", REF, "hi", logprobs=3))
