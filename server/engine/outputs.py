"""Tokens out: each sampled token becomes a RequestOutput (a text delta, or the final state of a finished request).

A request finishes on an end-of-sequence token, a stop string, max_new_tokens, a grammar's refusal, or from the
engine (classified, cancelled, failed). Streamed text never carries a character that is still incomplete: its
bytes are held back until the token that completes it arrives, and dropped if the request ends first.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from .request import RequestOutput, Sequence
from .tokenizer import SharedTokenizer


class OutputProcessor:
    def __init__(self, tokenizer: SharedTokenizer,
                 on_finish: Callable[[Sequence, RequestOutput], None] | None = None):
        self.tokenizer = tokenizer
        self.eos_ids: frozenset[int] = frozenset()  # tokens that end a request unless it asks ignore_eos
        self.on_finish = on_finish                  # every final output, once: metrics

    def append_token(self, seq: Sequence, token: int) -> RequestOutput:
        """One sampled token of a generating request: its text delta, or the final output if it ends the request."""
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        sampling = seq.request.sampling
        if seq.error is not None:  # set by the logits processor: the grammar refused the sampled token
            return self.finish(seq, "error", error=seq.error)
        if token in self.eos_ids and not sampling.ignore_eos:
            return self.finish(seq, "stop")
        seq.output_ids.append(token)
        delta = self._detokenize(seq)
        if sampling.stop and len(seq.output_ids) >= sampling.min_tokens:
            cut = self._stop_at(seq, delta)
            if cut is not None:
                delta = delta[: max(0, len(delta) - (len(seq.text) - cut))]  # the delta's part before the stop
                seq.text = seq.text[:cut]
                return self.finish(seq, "stop", new_tokens=[token], new_text=delta, truncated=True)
        if len(seq.output_ids) >= sampling.max_new_tokens:
            return self.finish(seq, "length", new_tokens=[token], new_text=delta)
        return attach_logprobs(seq, RequestOutput(seq.request_id, [token], delta, finished=False))

    @staticmethod
    def _stop_at(seq: Sequence, delta: str) -> int | None:
        """Where the earliest stop string starts in the text's tail: the part that the new delta can have
        completed one in, so that a long output is not searched again from its start at every token."""
        stops = seq.request.sampling.stop
        start = max(0, len(seq.text) - (max(map(len, stops)) + len(delta)))
        hits = [i for i in (seq.text.find(stop, start) for stop in stops) if i >= 0]
        return min(hits) if hits else None

    def _detokenize(self, seq: Sequence) -> str:
        """Incremental detokenization: only text that can no longer change is emitted (no split characters).
        New tokens are decoded together with the last emitted piece (from `prefix_offset`), not alone, because
        tokenizers such as SentencePiece read a token differently at the start of a text."""
        prefix = self.tokenizer.decode(seq.output_ids[seq.prefix_offset:seq.read_offset])
        full = self.tokenizer.decode(seq.output_ids[seq.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.output_ids)
            seq.text += delta
            return delta
        return ""

    def classified(self, seq: Sequence, scores: list[float]) -> RequestOutput:
        """A classify request's final output: each label's probability (softmax of its log-likelihood)."""
        top = max(scores)
        exp = [math.exp(s - top) for s in scores]
        total = sum(exp)
        seq.label_scores = scores
        out = self.finish(seq, "stop")
        out.labels = [lab.name for lab in seq.request.prompt.spec.labels]
        out.label_probs = [e / total for e in exp]
        return out

    def finish(self, seq: Sequence, reason: str, *, error: str | None = None, new_tokens: list[int] | None = None,
               new_text: str = "", truncated: bool = False) -> RequestOutput:
        """The final output: held-back text flushed (unless a stop string `truncated` it), usage and timings."""
        seq.finish_reason, seq.error = reason, error
        if seq.output_ids and not truncated:  # flush text held back for a split character
            full = self.tokenizer.decode(seq.output_ids)
            if seq.read_offset < len(seq.output_ids) and full.endswith("\ufffd"):
                # the last character was cut by the end (max_new_tokens, EOS): its bytes are no text, so they go,
                # and only the complete characters held back with them are flushed
                full = full[:-1]
            if full.startswith(seq.text) and len(full) > len(seq.text):
                new_text += full[len(seq.text):]
                seq.text = full
        now = time.monotonic()
        out = RequestOutput(seq.request_id, new_tokens or [], new_text, finished=True, finish_reason=reason,
                            text=seq.text, prompt_tokens=seq.prompt_tokens, completion_tokens=len(seq.output_ids),
                            error=error,
                            queue_wait_s=(seq.scheduled_at or now) - seq.arrival,
                            ttft_s=(seq.first_token_at - seq.arrival) if seq.first_token_at else None)
        attach_logprobs(seq, out)
        if self.on_finish is not None:
            self.on_finish(seq, out)
        return out


def attach_logprobs(seq: Sequence, out: RequestOutput) -> RequestOutput:
    """Hand out the log-probabilities the runner recorded since the last output: the prompt's (echo) on the first
    output and again on the final one, each sampled token's (EOS included) as it comes, all on the final."""
    req = seq.request
    if seq.prompt_logprobs is not None and (out.finished or not seq.prompt_sent):
        out.prompt_logprobs = seq.prompt_logprobs
        seq.prompt_sent = True
    if req.logprobs is not None:
        out.new_logprobs = seq.output_logprobs[seq.sent_logprobs:]
        seq.sent_logprobs = len(seq.output_logprobs)
        if out.finished:
            out.logprobs = list(seq.output_logprobs)
    return out
