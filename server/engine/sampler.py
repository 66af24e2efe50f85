"""Batched sampling: every row has its own temperature, top-k, top-p and seed, and none loops in Python.

Random draws come from a counter-based hash of (seed, step, token id), not from a shared generator, so a request's
sample depends only on its own seed and position: the same seed gives the same text whatever else is batched.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _hash_uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise per (row, token), a pure function of (seed, step, token). [n, V] float64"""
    tok = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]      # [1, V]
    s = (seed & _MASK32)[:, None] ^ ((seed >> 32) & _MASK32)[:, None] * 0x27D4EB2F
    x = (s * 0x165667B1 + step[:, None] * 0x61C88647 + tok * 0x2C1B3C6D) & _MASK32  # [n, V]
    for mul in (0x7FEB352D, 0x846CA68B):  # lowbias32 finaliser; int64 products wrap, the low 32 bits are exact
        x = x ^ (x >> 16)
        x = (x * mul) & _MASK32
    x = x ^ (x >> 16)
    return (x.double() + 0.5) / 4294967296.0


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """logits [n, V] fp32; per-row params [n]. Rows with temperature 0 take the argmax. Returns [n] token ids."""
    greedy = logits.argmax(dim=-1)                                                 # [n]
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    rows = sampling.nonzero()[:, 0]
    lg = logits[rows] / temperature[rows, None]                                    # [m, V]
    V = lg.shape[-1]
    k = top_k[rows]
    p = top_p[rows]
    if bool(((k > 0) & (k < V)).any()) or bool((p < 1).any()):
        sorted_lg, order = lg.sort(dim=-1, descending=True)                        # [m, V]
        rank = torch.arange(V, device=lg.device)[None, :]
        drop = (k[:, None] > 0) & (rank >= k[:, None])
        probs = sorted_lg.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs                                      # mass strictly above each token
        drop |= before >= p[:, None]                                               # keep the smallest set >= top_p
        drop[:, 0] = False
        sorted_lg = sorted_lg.masked_fill(drop, float("-inf"))
        lg = torch.full_like(lg, float("-inf")).scatter(-1, order, sorted_lg)
    gumbel = -torch.log(-torch.log(_hash_uniform(seed[rows], step[rows], V)))     # [m, V]
    drawn = (lg.double() + gumbel).argmax(dim=-1)                                  # Gumbel-max = a softmax draw
    out = greedy.clone()
    out[rows] = drawn
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of the raw logits (no temperature, top-k or top-p): each row's token and its top_n most likely.
    logits [m, V] fp32, tokens [m]. Returns ([m] logprob of the token, [m, N] top logprobs, [m, N] top ids)."""
    logp = torch.log_softmax(logits.float(), dim=-1)                               # [m, V]
    chosen = logp.gather(1, tokens[:, None].long())[:, 0]                          # [m]
    if top_n <= 0:
        empty = logp.new_zeros(logp.shape[0], 0)
        return chosen, empty, empty.long()
    vals, ids = top_by_id(logp, min(top_n, logp.shape[-1]))                         # [m, N] each
    return chosen, vals, ids


def top_by_id(logp: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest values of each row [m, V], equal values ordered by token id (and at the cut, the smallest ids
    kept): a function of the row alone. topk's own order among equal values depends on how many rows it gets."""
    vals, ids = logp.topk(n, dim=-1)                                               # [m, n]
    edge = vals[:, -1:]
    cut = (logp == edge).sum(-1) > (vals == edge).sum(-1)                          # a tie continues past the n-th
    if bool(cut.any()):
        rows = cut.nonzero()[:, 0]
        s_vals, s_ids = torch.sort(logp[rows], dim=-1, descending=True, stable=True)
        vals[rows], ids[rows] = s_vals[:, :n], s_ids[:, :n]
    by_id = ids.argsort(dim=-1)
    vals, ids = vals.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = vals.argsort(dim=-1, descending=True, stable=True)
    return vals.gather(-1, by_value), ids.gather(-1, by_value)
