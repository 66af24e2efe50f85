"""server/engine/kv_cache.py: where a step's keys/values land in the block pools, prefix writes, and how the budget
is split between full and sliding groups."""

from __future__ import annotations

import torch

from server.engine.block_manager import GroupSpec
from server.engine.kv_cache import CacheShape, PagedKVCache, plan_groups

CPU = torch.device("cpu")
SHAPE = CacheShape(kv_heads=2, head_dim=3, block_size=16, dtype=torch.float32)


def cache(blocks: int = 4, layers: int = 2) -> PagedKVCache:
    return PagedKVCache([GroupSpec(blocks, None, tuple(range(layers)))], layers, SHAPE, CPU)


def test_update_writes_each_token_at_its_block_and_offset_and_returns_the_pools():
    c = cache()
    blocks, offsets = torch.tensor([2, 2, 0]), torch.tensor([5, 6, 15])
    c.write = [c.flat_index(blocks, offsets)]
    k = torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)       # [1, H, T, Dh]
    keys, values = c.update(k, -k, layer_idx=1)
    assert keys is c.keys[1] and values is c.values[1]
    assert keys.shape == (4, 2, 3, 16) and values.shape == (4, 2, 16, 3)     # keys transposed in their block
    for t, (b, o) in enumerate(zip(blocks.tolist(), offsets.tolist())):
        for h in range(2):
            assert keys[b, h, :, o].tolist() == k[0, h, t].tolist()
            assert values[b, h, o, :].tolist() == (-k[0, h, t]).tolist()


def test_prefix_writes_go_to_every_layer_of_the_group():
    c = cache()
    kv = torch.randn(2, 2, 2, 5, 3)                                          # [L, 2, H, P, Dh]
    slots = torch.arange(5)
    c.write_prefix(torch.tensor([3] * 5), slots, kv, layers=[0, 1])
    for layer in range(2):
        assert torch.equal(c.keys[layer][3, :, :, :5], kv[layer, 0].transpose(1, 2))
        assert torch.equal(c.values[layer][3, :, :5, :], kv[layer, 1])


def test_the_budget_buys_blocks_and_sliding_groups_get_no_more_than_their_window_needs():
    per_block = SHAPE.block_bytes(layers=1)                                  # 2 * 2 heads * 16 * 3 * 4 bytes
    assert per_block == 2 * 2 * 16 * 3 * 4
    groups = plan_groups([None, None], 100 * per_block * 2, SHAPE, max_rows=4, max_chunk=32)
    assert [(g.num_blocks, g.window, g.layers) for g in groups] == [(100, None, (0, 1))]
    # one full and three sliding layers, window 16: a sliding row needs (16 + 32) / 16 + 2 = 5 blocks, 4 rows 20
    groups = plan_groups([16, None, 16, 16], 400 * per_block, SHAPE, max_rows=4, max_chunk=32)
    full, sliding = groups
    assert sliding.window == 16 and sliding.layers == (0, 2, 3) and sliding.num_blocks == 20
    assert full.window is None and full.num_blocks == (400 - 20 * 3)        # the rest goes to the full layer
    assert full.num_blocks * per_block + sliding.num_blocks * 3 * per_block <= 400 * per_block
    c = PagedKVCache(groups, 4, SHAPE, CPU)
    assert c.layer_group == [1, 0, 1, 1] and c.bytes() <= 400 * per_block
