"""OutputProcessor alone (a real tokenizer, no model): text deltas, split characters, stop strings, end of
sequence, max_new_tokens, grammar errors, label probabilities and the final output's contents."""

from __future__ import annotations

import math

import pytest

from prompt_core.layout import RowPlan
from prompt_core.spec import PromptKind, PromptSpec, make_labels
from server.engine.outputs import OutputProcessor
from server.engine.request import EngineRequest, PromptRef, SamplingParams, Sequence, TokenLogprob
from server.engine.tokenizer import SharedTokenizer
from tests.helpers import tokenizer

EOS = 2
REF = PromptRef("t@1", PromptSpec(PromptKind.HARD, 0, "{input}", labels=make_labels(["yes", "no"])))


@pytest.fixture
def finished() -> list:
    return []


@pytest.fixture
def proc(finished) -> OutputProcessor:
    p = OutputProcessor(SharedTokenizer(tokenizer()), on_finish=lambda seq, out: finished.append((seq, out)))
    p.eos_ids = frozenset({EOS})
    return p


def ids(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def seq(n: int = 16, **sampling) -> Sequence:
    req = EngineRequest("r", REF, "x", sampling=SamplingParams(max_new_tokens=n, **sampling))
    return Sequence(req, RowPlan(ids=[5, 6, 7], virt=[-1] * 3))


def feed(proc: OutputProcessor, s: Sequence, tokens: list[int]) -> list:
    outs = []
    for t in tokens:
        outs.append(proc.append_token(s, t))
        if outs[-1].finished:
            break
    return outs


def test_deltas_add_up_to_the_text_and_a_split_character_waits(proc):
    s = seq()
    emoji = ids("🙂")
    assert len(emoji) == 2  # one character, two tokens: the test needs a split
    outs = feed(proc, s, ids(" hello") + emoji)
    assert [o.new_text for o in outs] == [" hello", "", "🙂"]  # nothing of the half character goes out
    assert not any(o.finished for o in outs) and s.text == " hello🙂"
    assert [o.new_token_ids for o in outs] == [[t] for t in ids(" hello") + emoji]


def test_an_end_inside_a_character_drops_its_bytes_and_flushes_the_rest(proc, finished):
    s = seq(n=3)
    outs = feed(proc, s, ids("🙂🙂")[:3])
    final = outs[-1]
    assert (final.finished, final.finish_reason, final.completion_tokens) == (True, "length", 3)
    assert final.text == "🙂" and "".join(o.new_text for o in outs) == "🙂"
    assert not any("\ufffd" in o.new_text for o in outs)
    assert [out for _, out in finished] == [final]  # reported once, when it ends


def test_held_back_complete_characters_are_flushed_at_the_end(proc):
    tokens = ids("中文 日本語")
    s = seq(n=3)
    outs = feed(proc, s, tokens[:3])
    assert outs[-1].text == "中文 " and "".join(o.new_text for o in outs) == "中文 "


def test_a_stop_string_cuts_the_text_and_the_delta(proc):
    s = seq(stop=("wor", "never"))
    outs = feed(proc, s, ids(" hello world. Stop here"))
    assert len(outs) == 2  # " world" completes the stop string
    final = outs[-1]
    assert (final.finish_reason, final.text, final.new_text) == ("stop", " hello ", " ")
    assert "".join(o.new_text for o in outs) == final.text
    assert final.new_token_ids == ids(" world") and final.completion_tokens == 2  # the token is still usage


def test_the_earliest_of_several_stop_strings_wins(proc):
    outs = feed(proc, seq(stop=("world", "o w")), ids(" hello world. Stop here"))  # " world" completes both
    assert len(outs) == 2 and outs[-1].text == " hell" and outs[-1].finish_reason == "stop"


def test_stop_strings_wait_for_min_tokens(proc):
    tokens = ids(" hello world")
    first = proc.append_token(s := seq(stop=(" hello",), min_tokens=2), tokens[0])
    assert not first.finished and first.new_text == " hello"
    second = proc.append_token(s, tokens[1])
    assert second.finished and second.finish_reason == "stop"


def test_end_of_sequence_stops_without_counting_as_text(proc):
    s = seq()
    outs = feed(proc, s, ids(" hello") + [EOS] + ids(" world"))
    final = outs[-1]
    assert len(outs) == 2 and (final.finish_reason, final.text, final.completion_tokens) == ("stop", " hello", 1)
    assert final.new_token_ids == [] and s.output_ids == ids(" hello")


def test_ignore_eos_keeps_the_token_and_goes_on(proc):
    s = seq(n=3, ignore_eos=True)
    outs = feed(proc, s, ids(" hello") + [EOS] + ids(" world"))
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason == "length" and s.output_ids == ids(" hello") + [EOS] + ids(" world")
    assert outs[-1].text == " hello world"  # the special token is no text


def test_max_new_tokens_finishes_with_length(proc):
    outs = feed(proc, seq(n=2), ids(" hello world. Stop"))
    assert [o.finished for o in outs] == [False, True]
    assert (outs[-1].finish_reason, outs[-1].text, outs[-1].new_text) == ("length", " hello world", " world")


def test_a_grammar_refusal_ends_the_request_with_its_error(proc):
    s = seq()
    proc.append_token(s, ids(" hello")[0])
    s.error = "the grammar refused the token"
    out = proc.append_token(s, ids(" world")[0])
    assert (out.finished, out.finish_reason, out.error) == (True, "error", "the grammar refused the token")
    assert out.text == " hello" and out.completion_tokens == 1


def test_classified_gives_each_label_its_softmax_probability(proc, finished):
    s = seq()
    out = proc.classified(s, [0.0, math.log(3.0)])
    assert (out.finished, out.finish_reason, out.labels) == (True, "stop", ["yes", "no"])
    assert out.label_probs == pytest.approx([0.25, 0.75])
    assert s.label_scores == [0.0, math.log(3.0)] and len(finished) == 1


def test_logprobs_go_out_with_their_tokens_and_all_at_the_end(proc):
    s = seq(n=2)
    s.request.logprobs = 0
    tokens = ids(" hello world")
    lps = [TokenLogprob(t, -0.5 - i) for i, t in enumerate(tokens)]
    s.output_logprobs.append(lps[0])  # the runner records a token's log-probability before it is appended
    first = proc.append_token(s, tokens[0])
    s.output_logprobs.append(lps[1])
    last = proc.append_token(s, tokens[1])
    assert first.new_logprobs == [lps[0]] and first.logprobs is None
    assert last.new_logprobs == [lps[1]] and last.logprobs == lps


def test_the_final_output_carries_usage_and_timings(proc):
    s = seq(n=1)
    out = proc.append_token(s, ids(" hello")[0])
    assert (out.prompt_tokens, out.completion_tokens) == (3, 1)
    assert out.ttft_s is not None and out.ttft_s >= 0 and out.queue_wait_s >= 0
    cancelled = proc.finish(seq(), "cancelled")  # never scheduled, never a token
    assert (cancelled.finish_reason, cancelled.completion_tokens, cancelled.ttft_s) == ("cancelled", 0, None)
