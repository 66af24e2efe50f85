"""server/engine/kv_cache.py (SlotCache) and ModelRunner.release: where each row's keys/values are written, how
buffers grow, and how a finished row's hole is filled by the last row. Tiny buffers (one KV head of width 1), so
every slot's content can be named."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.engine.kv_cache import SlotCache
from server.engine.model_runner import ModelRunner

CPU = torch.device("cpu")


def cache(layers: int = 1) -> SlotCache:
    return SlotCache(layers, kv_heads=1, head_dim=1, dtype=torch.float32, device=CPU)


def slots_of(c: SlotCache, row: int, n: int, layer: int = 0, values: bool = False) -> list[float]:
    buf = (c.values if values else c.keys)[layer]    # [rows, H=1, slots, Dh=1]
    return buf[row, 0, :n, 0].tolist()


def test_buffers_grow_by_doubling_and_keep_what_they_held():
    c = cache()
    assert c.capacity == (8, 256)
    c.keys[0][3, 0, 5, 0] = 7.0
    c.ensure(9, 10)                                  # rows: max(9, 2 * 8); slots are enough
    assert c.capacity == (16, 256)
    c.ensure(3, 600)                                 # slots: max(600, 2 * 256)
    assert c.capacity == (16, 600)
    assert c.keys[0][3, 0, 5, 0] == 7.0
    c.ensure(16, 600)
    assert c.capacity == (16, 600)                   # enough already: no new buffers


def test_update_writes_each_query_at_its_slot_and_returns_the_rows_first_kv_len_slots():
    c = cache()
    c.prepare(slice(0, 2), torch.tensor([[3, 4], [5, 6]]), kv_len=7)
    k = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(2, 1, 2, 1)     # [n=2, H=1, Q=2, Dh=1]
    keys, values = c.update(k, -k, layer_idx=0)
    assert keys.shape == (2, 1, 7, 1) and c.get_seq_length() == 7
    assert keys[:, 0, :, 0].tolist() == [[0, 0, 0, 1, 2, 0, 0], [0, 0, 0, 0, 0, 3, 4]]
    assert values[:, 0, :, 0].tolist() == [[0, 0, 0, -1, -2, 0, 0], [0, 0, 0, 0, 0, -3, -4]]


def test_a_prefill_after_running_rows_writes_to_the_rows_after_them():
    c = cache()
    c.prepare(slice(2, 3), torch.tensor([[0, 1]]), kv_len=2)
    keys, _ = c.update(torch.tensor([5.0, 6.0]).view(1, 1, 2, 1), torch.zeros(1, 1, 2, 1), layer_idx=0)
    assert keys[:, 0, :, 0].tolist() == [[5, 6]]
    assert slots_of(c, 2, 2) == [5, 6] and slots_of(c, 0, 2) == [0, 0]


def test_prefixes_fill_the_first_slots_of_their_rows_in_every_layer():
    c = cache(layers=2)
    p = torch.arange(1, 9, dtype=torch.float32).view(2, 2, 1, 2, 1)   # [L=2, 2, H=1, T=2, Dh=1]
    q = torch.full((2, 2, 1, 1, 1), 9.0)                               # T=1
    c.write_prefixes([1, 3], [p, q])
    assert slots_of(c, 1, 3, layer=0) == [1, 2, 0] and slots_of(c, 1, 3, layer=0, values=True) == [3, 4, 0]
    assert slots_of(c, 1, 3, layer=1) == [5, 6, 0] and slots_of(c, 1, 3, layer=1, values=True) == [7, 8, 0]
    assert slots_of(c, 3, 2, layer=1) == [9, 0] and slots_of(c, 0, 3) == [0, 0, 0]


def test_move_row_copies_only_the_slots_in_use():
    c = cache()
    c.keys[0][0, 0, :4, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    c.keys[0][2, 0, :4, 0] = torch.tensor([3.0, 3.0, 3.0, 3.0])
    c.move_row(2, 0, length=3)
    assert slots_of(c, 0, 4) == [3, 3, 3, 1]


def runner_with_rows(extents: list[int]) -> tuple[ModelRunner, list[SimpleNamespace]]:
    """A runner over a one-layer random Llama, its rows filled by hand: row r holds r + 1 in every slot."""
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    runner = ModelRunner(LlamaForCausalLM(cfg).eval(), CPU, torch.float32, max_rows=4)
    seqs = [SimpleNamespace(row=r, kv_extent=e) for r, e in enumerate(extents)]
    runner.seqs = list(seqs)
    for r in range(len(seqs)):
        runner.cache.keys[0][r] = r + 1
        runner.lengths[r] = 10 + r
    return runner, seqs


def test_release_moves_the_last_row_into_the_hole():
    runner, (s0, s1, s2) = runner_with_rows([2, 2, 3])
    runner.release([s0])
    assert runner.seqs == [s2, s1] and (s0.row, s1.row, s2.row) == (-1, 1, 0)
    assert runner.lengths[:2].tolist() == [12, 11]                       # per-row state moves with the row
    assert runner.cache.keys[0][0, 0, :4, 0].tolist() == [3, 3, 3, 1]    # its 3 slots in use, nothing more


def test_releasing_the_last_row_moves_nothing():
    runner, (s0, s1) = runner_with_rows([2, 2])
    runner.release([s1])
    assert runner.seqs == [s0] and s0.row == 0 and s1.row == -1
    assert runner.cache.keys[0][0, 0, :2, 0].tolist() == [1, 1]


def test_releasing_several_rows_keeps_the_survivors_compact():
    runner, (s0, s1, s2) = runner_with_rows([2, 2, 2])
    runner.release([s0, s2])           # the last row goes first, so row 1 fills the hole at 0
    assert runner.seqs == [s1] and s1.row == 0 and s0.row == s2.row == -1
    assert runner.lengths[0] == 11 and runner.cache.keys[0][0, 0, :2, 0].tolist() == [2, 2]
    assert runner.num_rows == 1
