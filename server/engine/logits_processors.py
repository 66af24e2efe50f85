"""Per-row logits processing between the model's logits and the sampler: min_tokens (end-of-sequence held back),
logit_bias, presence and frequency penalties, and grammar masks. One batched step holds rows of every kind, each
processed by its own parameters.

A row with none of them is untouched, and a step where no row has any costs one Python pass over the rows (no
tensor work, no copy). Rows that need work are processed on a copy, so the model's logits stay as they were (the
trace used by batched-equals-alone tests records them). The state lives on each Sequence (its generated ids and
its grammar matcher), so row moves, preemption and resumption need nothing here.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .constraints import MaskBuffer
from .request import Sequence

log = logging.getLogger(__name__)


class LogitsProcessor:
    def __init__(self, vocab_size: int, on_mask: Callable[[float, int], None] | None = None):
        self.vocab_size = vocab_size
        self.on_mask = on_mask                                  # (seconds, rows) per masked step: metrics
        self.masks = MaskBuffer(vocab_size)
        self.eos_ids: list[int] = []                            # what min_tokens holds back; set by the engine

    @staticmethod
    def needs(seq: Sequence) -> bool:
        sp = seq.request.sampling
        return (seq.matcher is not None or bool(sp.logit_bias) or sp.penalized
                or len(seq.output_ids) < sp.min_tokens)

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [n, V] of seqs (row i is seqs[i]). Returns logits, or a processed copy if any row needs it."""
        bias = [i for i, s in enumerate(seqs) if s.request.sampling.logit_bias]
        pen = [i for i, s in enumerate(seqs) if s.request.sampling.penalized and s.output_ids]
        gram = [i for i, s in enumerate(seqs) if s.matcher is not None]
        early = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.request.sampling.min_tokens] \
            if self.eos_ids else []
        if not (bias or pen or gram or early):
            return logits
        logits = logits.clone()
        dev = logits.device
        if early:  # min_tokens: a row short of its minimum cannot end
            rows, eos = torch.tensor(early, device=dev), torch.tensor(self.eos_ids, device=dev)
            logits[rows[:, None], eos[None, :]] = float("-inf")                   # [e, |eos|]
        if bias:
            rows, toks, vals = [], [], []
            for i in bias:
                for tok, b in seqs[i].request.sampling.logit_bias:
                    rows.append(i)
                    toks.append(tok)
                    vals.append(b)
            logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(toks, device=dev)),
                              torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
        if pen:
            longest = max(len(seqs[i].output_ids) for i in pen)
            ids = torch.full((len(pen), longest), self.vocab_size, dtype=torch.long)  # padding counts in column V
            for j, i in enumerate(pen):
                out = seqs[i].output_ids
                ids[j, :len(out)] = torch.tensor(out, dtype=torch.long)
            counts = torch.zeros(len(pen), logits.shape[-1] + 1, dtype=logits.dtype, device=dev)
            counts.scatter_add_(1, ids.to(dev), torch.ones(ids.shape, dtype=logits.dtype, device=dev))
            counts = counts[:, :-1]
            freq = torch.tensor([seqs[i].request.sampling.frequency_penalty for i in pen], dtype=logits.dtype,
                                device=dev)
            pres = torch.tensor([seqs[i].request.sampling.presence_penalty for i in pen], dtype=logits.dtype,
                                device=dev)
            r = torch.tensor(pen, device=dev)
            logits[r] -= counts * freq[:, None] + (counts > 0).to(logits.dtype) * pres[:, None]
        if gram:
            t0 = time.perf_counter()
            self.masks.apply(logits, [seqs[i].matcher for i in gram], gram)
            if self.on_mask is not None:
                self.on_mask(time.perf_counter() - t0, len(gram))
        return logits

    @staticmethod
    def accept(seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Advance each constrained row's grammar by its sampled token (tokens [n]). A token the grammar refuses (it
        can only be one drawn from a row whose every logit was masked or not a number) ends that request with an
        error."""
        if not any(s.matcher is not None for s in seqs):
            return
        for s, tok in zip(seqs, tokens.tolist()):
            if s.matcher is not None and s.error is None and not s.matcher.accept_token(tok):
                log.warning("request %s: the grammar refused token %d", s.request_id, tok)
                s.error = f"the constrained output could not continue (token {tok} refused by the grammar)"
