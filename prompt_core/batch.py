"""Batch rows of different tasks and kinds into one set of step tensors.

Every row owns a run of cache slots: `prefix` slots of raw prefix keys/values, then from `tok_start` on, one slot per
query. The mask and the rotary positions come from that layout alone, so a row's result does not depend on padding
or on its neighbours. The server's slot cache and the trainer's dynamic cache use the same layout; they differ only
in where `tok_start` sits (right after the row's prefix, or after the longest prefix in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import RowPlan


@dataclass
class StepInputs:
    """The tensors of one forward pass over n rows and Q queries per row."""
    ids: torch.Tensor                   # [n, Q] token ids; 0 at virtual-token and padding queries
    virt: torch.Tensor                  # [n, Q] row of `virtual_table` for virtual tokens, -1 elsewhere
    virtual_table: torch.Tensor | None  # [V, D] the virtual tokens of all rows, concatenated
    positions: torch.Tensor             # [n, Q] rotary position of each query
    slots: torch.Tensor                 # [n, Q] cache slot each query's key/value is written to
    mask: torch.Tensor                  # [n, 1, Q, K] additive attention mask over the first K slots
    key_positions: torch.Tensor         # [n, K] position of the token in each slot (for attention windows)

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]


@dataclass
class Readout:
    """Which hidden states a prefill must turn into logits."""
    last_q: torch.Tensor        # [n] query index of each row's last prompt token
    label_row: torch.Tensor     # [E] row of each scored verbalizer token
    label_q: torch.Tensor       # [E] query whose logits predict that token
    label_tok: torch.Tensor     # [E] the verbalizer token id
    label_index: torch.Tensor   # [E] which label (over all rows) the token belongs to
    labels_per_row: list[int]   # how many labels each row scores (0 for generation rows)


def attention_mask(prefix: torch.Tensor, tok_start: torch.Tensor, ctx_end: torch.Tensor, seg_start: torch.Tensor,
                   slots: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """A query sees its row's prefix slots, a shared context [tok_start, ctx_end), and its own segment
    [seg_start, slot]. Prompt tokens: empty context, segment from tok_start (plain causal attention). Label tokens:
    the whole prompt as context, their own verbalizer as segment, so each label is scored as if alone.

    prefix, tok_start: [n]; ctx_end, seg_start, slots: [n, Q]. Returns [n, 1, Q, kv_len]."""
    s = torch.arange(kv_len, device=slots.device)                      # [K]
    allowed = (s < prefix[:, None, None]) \
        | ((s >= tok_start[:, None, None]) & (s < ctx_end[..., None])) \
        | ((s >= seg_start[..., None]) & (s <= slots[..., None]))     # [n, Q, K]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=slots.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]                                               # [n, 1, Q, K]


def key_positions(prefix: torch.Tensor, tok_start: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Position of the token held in each slot: prefix slot s holds position s (a prefix occupies positions
    0..P-1, as a PEFT prefix does in front of the input), token slot s holds position P + (s - tok_start).

    prefix, tok_start: [n]. Returns [n, kv_len]."""
    s = torch.arange(kv_len, device=prefix.device)                    # [K]
    return torch.where(s < prefix[:, None], s, s - tok_start[:, None] + prefix[:, None])


def windowed(mask: torch.Tensor, key_pos: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """A sliding-window layer's mask: also hide keys `window` or more positions behind the query (transformers'
    `sliding_window_overlay`: a query at q sees k > q - window).

    mask: [n, 1, Q, K]; key_pos: [n, K]; positions: [n, Q]."""
    too_old = key_pos[:, None, :] <= positions[..., None] - window    # [n, Q, K]
    return mask.masked_fill(too_old[:, None], torch.finfo(mask.dtype).min)


def build_prefill(plans: list[RowPlan], tok_start: list[int], virtual: list[torch.Tensor | None],
                  device: torch.device, dtype: torch.dtype) -> tuple[StepInputs, Readout]:
    """Lay out the prompt tokens and, for classification rows, the verbalizer tokens of every label.

    tok_start[i]: first token slot of row i (>= its prefix length). virtual[i]: the row's [T, D] virtual tokens."""
    n = len(plans)
    Q = max(p.num_queries for p in plans)
    ids = [[0] * Q for _ in range(n)]
    virt = [[-1] * Q for _ in range(n)]
    pos = [[0] * Q for _ in range(n)]
    ctx_end = [[0] * Q for _ in range(n)]
    seg_start = [[0] * Q for _ in range(n)]
    last_q, lab_row, lab_q, lab_tok, lab_idx, per_row = [], [], [], [], [], []
    tables, offsets = [], {}
    label_base = 0
    for i, (plan, t0, table) in enumerate(zip(plans, tok_start, virtual)):
        off = 0
        if table is not None:  # rows of the same task share one copy of its virtual tokens
            key = id(table)
            if key not in offsets:
                offsets[key] = sum(t.shape[0] for t in tables)
                tables.append(table)
            off = offsets[key]
        nt = plan.num_tokens
        row_ids, row_virt, row_pos = ids[i], virt[i], pos[i]
        for j, (tok, v) in enumerate(zip(plan.ids, plan.virt)):
            row_ids[j] = tok
            row_virt[j] = v + off if v >= 0 else -1
            row_pos[j] = plan.prefix + j
            ctx_end[i][j] = t0
            seg_start[i][j] = t0
        last_q.append(nt - 1)
        q = nt
        for li, label in enumerate(plan.labels):
            seg = t0 + q
            lab_row.append(i)
            lab_q.append(nt - 1)
            lab_tok.append(label[0])
            lab_idx.append(label_base + li)
            for k, tok in enumerate(label[:-1]):
                row_ids[q] = tok
                row_pos[q] = plan.prefix + nt + k
                ctx_end[i][q] = t0 + nt
                seg_start[i][q] = seg
                lab_row.append(i)
                lab_q.append(q)
                lab_tok.append(label[k + 1])
                lab_idx.append(label_base + li)
                q += 1
        for j in range(q, Q):  # padding queries see only their own slot
            ctx_end[i][j] = t0
            seg_start[i][j] = t0 + j
        label_base += len(plan.labels)
        per_row.append(len(plan.labels))
    L = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    t_start = L(tok_start)
    slots = t_start[:, None] + torch.arange(Q, device=device)       # [n, Q]
    prefix = L([p.prefix for p in plans])
    kv_len = int(max(t + Q for t in tok_start))
    mask = attention_mask(prefix, t_start, L(ctx_end), L(seg_start), slots, kv_len, dtype)
    table = torch.cat([t.to(device=device, dtype=dtype) for t in tables]) if tables else None
    positions = L(pos)
    # the step's own slots hold its queries' positions (label tokens do not sit at slot - tok_start + prefix)
    kpos = key_positions(prefix, t_start, kv_len).scatter_(1, slots, positions)   # [n, K]
    step = StepInputs(ids=L(ids), virt=L(virt), virtual_table=table, positions=positions, slots=slots, mask=mask,
                      key_positions=kpos)
    readout = Readout(last_q=L(last_q), label_row=L(lab_row), label_q=L(lab_q), label_tok=L(lab_tok),
                      label_index=L(lab_idx), labels_per_row=per_row)
    return step, readout


def build_decode(ids: torch.Tensor, prefix: torch.Tensor, tok_start: torch.Tensor, lengths: torch.Tensor,
                 kv_len: int, dtype: torch.dtype) -> StepInputs:
    """One new token per row, written at slot `lengths` (all tensors [n], on the device; no Python per row).
    kv_len: max(lengths) + 1, passed in by the caller, who knows it without a device sync."""
    slots = lengths[:, None]                                          # [n, 1]
    positions = prefix[:, None] + (slots - tok_start[:, None])        # [n, 1]
    mask = attention_mask(prefix, tok_start, tok_start[:, None], tok_start[:, None], slots, kv_len, dtype)
    return StepInputs(ids=ids[:, None], virt=torch.full_like(slots, -1), virtual_table=None,
                      positions=positions, slots=slots, mask=mask,
                      key_positions=key_positions(prefix, tok_start, kv_len))
