"""SequenceBuilder alone (a real tokenizer, no model): the task tokens cached per prompt key, and what they give a
sequence (its shared head, its label tokens)."""

from __future__ import annotations

import pytest

from prompt_core.spec import PromptKind, PromptSpec, make_labels
from server.engine.config import EngineConfig
from server.engine.request import EngineRequest, InputTooLong, InvalidRequest, PromptRef, SamplingParams
from server.engine.sequences import SequenceBuilder, block_keys, cache_limit, task_tokens
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


def keyed(ref: PromptRef, text: str, tenant: str = "t", **kw) -> list[bytes]:
    seq = builder().make(EngineRequest("k", ref, text, tenant=tenant, **kw))
    return block_keys(seq, 4)


def test_block_keys_are_shared_only_within_one_task_version_and_its_head_across_tenants():
    long_head = PromptRef("chat@1", PromptSpec(PromptKind.HARD, 0, "You are a careful assistant who answers in "
                                                                   "French. {input}"))
    head = builder().task(long_head).head_len
    assert head >= 8
    mine = keyed(long_head, "Bonjour, comment allez-vous?")
    assert mine == keyed(long_head, "Bonjour, comment allez-vous?")               # the same request: same keys
    other_text = keyed(long_head, "Quelle heure est-il maintenant?")
    whole = head // 4                                                              # blocks inside the head
    assert other_text[:whole] == mine[:whole] and other_text[whole:] != mine[whole:]
    other_tenant = keyed(long_head, "Bonjour, comment allez-vous?", tenant="u")
    assert other_tenant[:whole] == mine[:whole]                                    # the task's head is shared
    assert not set(other_tenant[whole:]) & set(mine[whole:])                      # the tenant's input is not
    other_task = keyed(PromptRef("chat2@1", long_head.spec), "Bonjour, comment allez-vous?")
    new_content = keyed(PromptRef("chat@1", long_head.spec, content="other"), "Bonjour, comment allez-vous?")
    assert not set(other_task) & set(mine) and not set(new_content) & set(mine)


def test_soft_prompts_with_the_same_text_never_share_a_block():
    spec = PromptSpec(PromptKind.PROMPT_TUNING, 8, "{input}")
    a = keyed(PromptRef("task-a@1", spec), "the same words for both tasks here")
    b = keyed(PromptRef("task-b@1", spec), "the same words for both tasks here")
    assert a and not set(a) & set(b)


def test_the_cache_never_serves_the_last_prompt_token_nor_what_echo_scores():
    seq = builder().make(EngineRequest("k", REF, "a fine film indeed"))
    assert cache_limit(seq) == seq.plan.num_tokens - 1
    echo = builder().make(EngineRequest("e", REF, "a fine film indeed", echo=True, logprobs=0))
    assert cache_limit(echo) == echo.plan.input_span[0] - 1


def test_a_request_the_cache_can_never_hold_is_refused_at_once():
    b = SequenceBuilder(EngineConfig(), SharedTokenizer(tokenizer()), grammars=None, vocab_size=49152,
                        logits_size=49152, max_positions=512,
                        kv_refusal=lambda slots: f"{slots} slots" if slots > 40 else None)
    assert b.make(EngineRequest("ok", REF, "short", sampling=SamplingParams(max_new_tokens=8)))
    with pytest.raises(InputTooLong, match="slots"):
        b.make(EngineRequest("big", REF, "short", sampling=SamplingParams(max_new_tokens=64)))


def test_limits_are_checked_before_tokenizing():
    with pytest.raises(InvalidRequest, match="no labels"):
        builder().make(EngineRequest("x", PromptRef("h@1", PromptSpec(PromptKind.HARD)), "hi", mode="classify"))
    with pytest.raises(InvalidRequest, match="between 0 and 2"):
        builder(max_logprobs=2).make(EngineRequest("x", REF, "hi", logprobs=3))
