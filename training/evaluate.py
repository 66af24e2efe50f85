"""The evaluation harness shared by soft prompts and hard-prompt baselines.

Classify: argmax over `label_scores`, exactly as the server. Generate: greedy decoding on prompt_core (prefill, then
`build_decode` steps on the same cache), cut at EOS or at a newline after some text (every example answer is one
line), then exact match (after stripping surrounding whitespace) and token F1 (SQuAD-style, lower-cased, whitespace
tokens).
"""

from __future__ import annotations

from collections import Counter

import torch

from prompt_core.batch import build_decode
from prompt_core.forward import hidden_states, last_logits, logits

from .objective import Row, classify_scores, prefill


@torch.no_grad()
def classify_predictions(model, rows: list[Row], virtual, prefix, batch_size: int) -> tuple[list[int], torch.Tensor]:
    """Predicted label index per row and the scores. ([n], [n, K])"""
    scores = torch.cat([classify_scores(model, rows[i:i + batch_size], virtual, prefix).cpu()
                        for i in range(0, len(rows), batch_size)])
    return scores.argmax(-1).tolist(), scores


@torch.no_grad()
def greedy_decode(model, tokenizer, rows: list[Row], virtual, prefix, batch_size: int, max_new_tokens: int
                  ) -> list[str]:
    """Greedy continuations, `batch_size` rows at a time (rows sorted by length to waste little padding)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].plan.num_tokens)
    out: list[str] = [""] * len(rows)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        texts = _decode_batch(model, tokenizer, [rows[i] for i in idx], virtual, prefix, max_new_tokens,
                              tokenizer.eos_token_id)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def right_align(cache, width: int, lengths: list[int], Q: int) -> None:
    """Move each row's prompt keys/values so they end on the last slot of the prefill, in place.

    The dynamic cache appends every decode step at one slot for the whole batch; after this roll a row of nt tokens
    occupies [width + Q - nt, width + Q) and decodes with tok_start = width + Q - nt, so build_decode's mask and
    positions are exactly the server's. Keys already carry their rotary positions, so moving them changes nothing."""
    dev = cache.layers[0].keys.device
    shift = torch.tensor([Q - n for n in lengths], device=dev)                          # [n]
    s = torch.arange(Q, device=dev)                                                     # [Q]
    src = width + (s[None, :] - shift[:, None]) % Q                                     # [n, Q]
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)                                                    # [n, H, width + Q, Dh]
            idx = src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])          # [n, H, Q, Dh]
            setattr(layer, name, torch.cat([t[:, :, :width], t.gather(2, idx)], dim=2))


def _decode_batch(model, tokenizer, rows, virtual, prefix, max_new_tokens, eos) -> list[str]:
    n = len(rows)
    hidden, readout, cache = prefill(model, [r.plan for r in rows], virtual, prefix)
    dev, Q = hidden.device, hidden.shape[1]
    width = rows[0].plan.prefix
    lengths_py = [r.plan.num_tokens for r in rows]
    right_align(cache, width, lengths_py, Q)
    next_ids = last_logits(model, hidden, readout).argmax(-1)                           # [n]
    generated: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    pre = torch.full((n,), width, dtype=torch.long, device=dev)                         # [n] prefix slots
    tok_start = torch.tensor([width + Q - nt for nt in lengths_py], device=dev)        # [n]
    lengths = torch.full((n,), width + Q, dtype=torch.long, device=dev)                 # [n] slot of the new token
    dtype = model.get_input_embeddings().weight.dtype
    for k in range(max_new_tokens):
        for i, t in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if t == eos:
                done[i] = True
                continue
            generated[i].append(t)
            if "\n" in tokenizer.decode(generated[i]).lstrip():  # one-line answers end at a newline after text
                done[i] = True
        if all(done) or k == max_new_tokens - 1:
            break
        step = build_decode(next_ids, pre, tok_start, lengths, width + Q + k + 1, dtype)
        h = hidden_states(model, step, cache)                                           # [n, 1, D]
        next_ids = logits(model, h[:, 0]).argmax(-1)                                    # [n]
        lengths = lengths + 1
    return [tokenizer.decode(g).strip().split("\n")[0].strip() for g in generated]


def token_f1(pred: str, gold: str) -> float:
    p, g = pred.lower().split(), gold.lower().split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def evaluate(model, tokenizer, rows: list[Row], task: str, virtual, prefix, batch_size: int = 16,
             max_new_tokens: int = 32) -> dict:
    """Scores on `rows`; `score` is the number early stopping and the results table use (accuracy or EM), in %."""
    if task == "classify":
        preds, _ = classify_predictions(model, rows, virtual, prefix, batch_size)
        acc = 100.0 * sum(p == r.label for p, r in zip(preds, rows)) / len(rows)
        return {"score": acc, "accuracy": acc, "predictions": preds}
    texts = greedy_decode(model, tokenizer, rows, virtual, prefix, batch_size, max_new_tokens)
    em = 100.0 * sum(t == r.example.target.strip() for t, r in zip(texts, rows)) / len(rows)
    f1 = 100.0 * sum(token_f1(t, r.example.target) for t, r in zip(texts, rows)) / len(rows)
    return {"score": em, "exact_match": em, "token_f1": f1, "predictions": texts}
