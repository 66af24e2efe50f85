"""Losses computed with the server's own forward (prompt_core): what is trained is what is served.

All rows of a batch belong to one task, so they share one virtual table and one prefix; `tok_start` is the prefix
length for every row, which is where the `DynamicCache` from `prefix_cache` puts the first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prompt_core.batch import Readout, build_prefill
from prompt_core.forward import hidden_states, label_scores, logits, prefix_cache
from prompt_core.layout import RowPlan, encode, plan_row
from prompt_core.spec import PromptSpec

from .data import Example


@dataclass
class Row:
    """One example, tokenized once: its plan (with the output tokens appended for generate) and its target."""
    plan: RowPlan
    example: Example
    label: int = -1        # gold label index (classify)
    num_output: int = 0    # output tokens (+ EOS) appended to the plan (generate, when trained on)


def make_rows(spec: PromptSpec, tokenizer, examples: list[Example], task: str, with_outputs: bool) -> list[Row]:
    """Classify rows carry every label's verbalizer; generate rows carry output + EOS when trained on."""
    names = [lab.name for lab in spec.labels]
    label_ids = [encode(tokenizer, lab.verbalizer) for lab in spec.labels] if task == "classify" else None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for ex in examples:
        try:
            plan = plan_row(spec, tokenizer, ex.input, with_labels=task == "classify", label_ids=label_ids)
        except ValueError as e:
            raise ValueError(f"{ex.source}: {e}") from None
        if task == "classify":
            if ex.target not in names:
                raise ValueError(f"{ex.source}: label {ex.target!r} is not one of {names}")
            rows.append(Row(plan, ex, label=names.index(ex.target)))
        elif with_outputs:
            out = encode(tokenizer, ex.target) + eos
            plan = RowPlan(ids=plan.ids + out, virt=plan.virt + [-1] * len(out), prefix=plan.prefix)
            rows.append(Row(plan, ex, num_output=len(out)))
        else:
            rows.append(Row(plan, ex))
    return rows


def prefill(model, plans: list[RowPlan], virtual: torch.Tensor | None, prefix: torch.Tensor | None
            ) -> tuple[torch.Tensor, Readout, object]:
    """Batched prefill of one task's rows. Returns hidden [n, Q, D], the readout and the cache (for decoding)."""
    weight = model.get_input_embeddings().weight
    width = plans[0].prefix
    n = len(plans)
    step, readout = build_prefill(plans, [width] * n, [virtual] * n, weight.device, weight.dtype)
    cache = prefix_cache(model, [prefix] * n if prefix is not None else [None] * n, width)
    return hidden_states(model, step, cache), readout, cache


def classify_scores(model, rows: list[Row], virtual, prefix) -> torch.Tensor:
    """Each label's full-verbalizer log-likelihood, as the server's classify computes it. [n, K]"""
    hidden, readout, _ = prefill(model, [r.plan for r in rows], virtual, prefix)
    return torch.stack(label_scores(model, hidden, readout))


def classify_loss(model, rows: list[Row], virtual, prefix) -> torch.Tensor:
    """Cross-entropy of the softmax over the label scores: it trains exactly the quantity whose argmax is served."""
    scores = classify_scores(model, rows, virtual, prefix)                 # [n, K]
    gold = torch.tensor([r.label for r in rows], device=scores.device)
    return F.cross_entropy(scores, gold)


def generate_loss(model, rows: list[Row], virtual, prefix) -> torch.Tensor:
    """Mean next-token NLL over the output tokens (and EOS) only; prompt tokens carry no loss."""
    hidden, _, _ = prefill(model, [r.plan for r in rows], virtual, prefix)
    row_idx, q_idx, targets = [], [], []
    for i, r in enumerate(rows):
        start = r.plan.num_tokens - r.num_output                            # first output query
        for q in range(start, r.plan.num_tokens):
            row_idx.append(i)
            q_idx.append(q - 1)
            targets.append(r.plan.ids[q])
    dev = hidden.device
    h = hidden[torch.tensor(row_idx, device=dev), torch.tensor(q_idx, device=dev)]  # [E, D]
    return F.cross_entropy(logits(model, h), torch.tensor(targets, device=dev))


def loss_fn(task: str):
    return classify_loss if task == "classify" else generate_loss
