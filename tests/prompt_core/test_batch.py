"""prompt_core/batch.py: the step tensors of a mixed batch (build_prefill, build_decode), its masks and positions.

Every expected value is worked out from the slot layout: a row owns `prefix` slots, then one slot per query from
`tok_start`. Masks are read as "allowed" matrices (0 where a query may attend, the dtype's minimum elsewhere)."""

from __future__ import annotations

import torch

from prompt_core.batch import attention_mask, build_decode, build_prefill, key_positions, windowed
from prompt_core.layout import RowPlan

CPU = torch.device("cpu")
F32 = torch.float32
MIN = torch.finfo(F32).min


def row(ids: list[int], prefix: int = 0, virt: list[int] | None = None, labels=None) -> RowPlan:
    return RowPlan(ids=ids, virt=virt if virt is not None else [-1] * len(ids), prefix=prefix, labels=labels or [])


def allowed(mask: torch.Tensor) -> list[list[list[int]]]:
    """[n, 1, Q, K] additive mask -> [n][Q][K] of 1 (may attend) / 0 (hidden)."""
    assert set(mask.unique().tolist()) <= {0.0, MIN}
    return (mask[:, 0] == 0).int().tolist()


def tril(n: int) -> list[list[int]]:
    return [[int(k <= q) for k in range(n)] for q in range(n)]


def prefill(plans, tok_start=None, virtual=None):
    tok_start = tok_start if tok_start is not None else [p.prefix for p in plans]
    return build_prefill(plans, tok_start, virtual or [None] * len(plans), CPU, F32)


def test_a_short_row_padded_by_two_queries_sees_only_its_own_tokens():
    step, readout = prefill([row([11, 12, 13, 14, 15]), row([21, 22, 23])])
    assert step.mask.shape == (2, 1, 5, 5) and step.mask.dtype is F32
    assert allowed(step.mask)[0] == tril(5)
    assert allowed(step.mask)[1] == [[1, 0, 0, 0, 0],
                                     [1, 1, 0, 0, 0],
                                     [1, 1, 1, 0, 0],
                                     [0, 0, 0, 1, 0],   # padding queries see only their own slot,
                                     [0, 0, 0, 0, 1]]   # so they never yield a fully hidden row (NaN in softmax)
    assert step.ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]]
    assert step.positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    assert step.slots.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert step.virt.tolist() == [[-1] * 5, [-1] * 5] and step.virtual_table is None
    assert readout.last_q.tolist() == [4, 2]
    assert readout.labels_per_row == [0, 0] and readout.label_row.numel() == 0


def test_a_prefix_row_sees_its_prefix_slots_and_counts_positions_after_them():
    step, _ = prefill([row([7, 8, 9], prefix=2)])           # tok_start = 2: slots 0, 1 hold the prefix
    assert step.kv_len == 5
    assert allowed(step.mask)[0] == [[1, 1, 1, 0, 0],
                                     [1, 1, 1, 1, 0],
                                     [1, 1, 1, 1, 1]]
    assert step.slots.tolist() == [[2, 3, 4]]
    assert step.positions.tolist() == [[2, 3, 4]]           # a PEFT prefix occupies positions 0..P-1
    assert step.key_positions.tolist() == [[0, 1, 2, 3, 4]]


def test_rows_sharing_a_token_start_hide_the_slots_a_shorter_prefix_does_not_fill():
    """The trainer's layout: every row's tokens start after the longest prefix in the batch."""
    step, _ = prefill([row([1, 2], prefix=2), row([3, 4])], tok_start=[2, 2])
    with_prefix, without = allowed(step.mask)
    assert with_prefix == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert without == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert step.positions.tolist() == [[2, 3], [0, 1]]
    assert step.key_positions.tolist() == [[0, 1, 2, 3], [-2, -1, 0, 1]]  # unused slots: hidden, positions moot


def test_each_label_sees_the_prompt_and_its_own_tokens_not_the_other_labels():
    step, readout = prefill([row([10, 11], labels=[[20, 21], [30, 31]])])
    # queries: the prompt (10, 11), then every verbalizer but its last token (20 of label 0, 30 of label 1)
    assert step.ids.tolist() == [[10, 11, 20, 30]]
    assert allowed(step.mask)[0] == [[1, 0, 0, 0],
                                     [1, 1, 0, 0],
                                     [1, 1, 1, 0],
                                     [1, 1, 0, 1]]        # label 1 does not see label 0's slot 2
    assert step.positions.tolist() == [[0, 1, 2, 2]]      # both labels continue the prompt at position 2
    assert step.key_positions.tolist() == [[0, 1, 2, 2]]  # slots hold their queries' positions, not slot order
    assert readout.last_q.tolist() == [1]
    # each verbalizer token is predicted by the query before it: the prompt's last for first tokens
    assert readout.label_q.tolist() == [1, 2, 1, 3]
    assert readout.label_tok.tolist() == [20, 21, 30, 31]
    assert readout.label_index.tolist() == [0, 0, 1, 1]
    assert readout.label_row.tolist() == [0, 0, 0, 0]
    assert readout.labels_per_row == [2]


def test_label_indices_run_on_across_rows():
    _, readout = prefill([row([10, 11], labels=[[20], [30]]), row([12]), row([13], labels=[[40], [50]])])
    assert readout.label_row.tolist() == [0, 0, 2, 2]
    assert readout.label_q.tolist() == [1, 1, 0, 0]
    assert readout.label_index.tolist() == [0, 1, 2, 3]
    assert readout.labels_per_row == [2, 0, 2]


def test_rows_of_one_task_share_one_copy_of_its_virtual_tokens():
    a = torch.arange(6, dtype=F32).view(2, 3)              # [T=2, D=3]
    b = torch.full((1, 3), 9.0)                            # [T=1, D=3]
    plans = [row([0, 0, 5], virt=[0, 1, -1]), row([0, 6], virt=[0, -1]), row([0, 0, 7], virt=[0, 1, -1]), row([8])]
    step, _ = prefill(plans, virtual=[a, b, a, None])
    assert torch.equal(step.virtual_table, torch.cat([a, b]))  # [3, D]: a once, then b
    assert step.virt.tolist() == [[0, 1, -1], [2, -1, -1], [0, 1, -1], [-1, -1, -1]]


def test_a_sliding_window_hides_keys_window_or_more_positions_back():
    step, _ = prefill([row([1, 2, 3, 4])])
    masked = windowed(step.mask, step.key_positions, step.positions, window=2)
    assert allowed(masked)[0] == [[1, 0, 0, 0],
                                  [1, 1, 0, 0],
                                  [0, 1, 1, 0],
                                  [0, 0, 1, 1]]
    assert allowed(step.mask)[0] == tril(4)                # the full-attention mask is left as it was


def test_a_sliding_window_counts_prefix_positions():
    step, _ = prefill([row([7, 8, 9], prefix=2)])          # key positions 0..4, queries at 2, 3, 4
    assert allowed(windowed(step.mask, step.key_positions, step.positions, window=2))[0] == [[0, 1, 1, 0, 0],
                                                                                            [0, 0, 1, 1, 0],
                                                                                            [0, 0, 0, 1, 1]]


def test_a_sliding_window_measures_label_tokens_by_position_not_slot():
    step, _ = prefill([row([10, 11], labels=[[20, 21], [30, 31]])])
    # label 1's query sits in slot 3 at position 2: with window 2 it still sees position 1, the prompt's last token
    assert allowed(windowed(step.mask, step.key_positions, step.positions, window=2))[0] == [[1, 0, 0, 0],
                                                                                            [1, 1, 0, 0],
                                                                                            [0, 1, 1, 0],
                                                                                            [0, 1, 0, 1]]


def test_key_positions_of_prefix_and_token_slots():
    """Prefix slots 0..P-1 hold positions 0..P-1; token slot s holds P + (s - tok_start)."""
    kpos = key_positions(torch.tensor([3, 0]), torch.tensor([5, 1]), kv_len=7)
    assert kpos.tolist() == [[0, 1, 2, 1, 2, 3, 4], [-1, 0, 1, 2, 3, 4, 5]]


def test_attention_mask_context_and_segment():
    """One query at slot 4 with context [1, 3) and its own segment [4, 4]: prefix slot 0, slots 1, 2 and 4."""
    t = lambda *x: torch.tensor(x)  # noqa: E731
    mask = attention_mask(t(1), t(1), t([3]), t([4]), t([4]), kv_len=6, dtype=F32)  # [n=1, 1, Q=1, K=6]
    assert allowed(mask) == [[[1, 1, 1, 0, 1, 0]]]


def test_decode_writes_one_token_per_row_after_its_tokens():
    # row 0: prefix 2, tokens in slots 2, 3, the new one at 4; row 1: no prefix, token in slot 0, the new one at 1
    step = build_decode(torch.tensor([7, 8]), prefix=torch.tensor([2, 0]), tok_start=torch.tensor([2, 0]),
                        lengths=torch.tensor([4, 1]), kv_len=5, dtype=F32)
    assert step.ids.tolist() == [[7], [8]]
    assert step.slots.tolist() == [[4], [1]]
    assert step.positions.tolist() == [[4], [1]]
    assert allowed(step.mask) == [[[1, 1, 1, 1, 1]], [[1, 1, 0, 0, 0]]]
    assert step.key_positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert step.virt.tolist() == [[-1], [-1]] and step.virtual_table is None and step.kv_len == 5
