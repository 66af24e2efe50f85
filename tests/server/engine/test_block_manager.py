"""server/engine/block_manager.py: blocks held and freed, reference counts, the prefix cache's keys and LRU, sliding
windows giving their blocks back. Pure Python, like the module."""

from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, BlockTables, GroupSpec


def manager(blocks: int = 8, size: int = 4, window: int | None = None, caching: bool = True) -> BlockManager:
    return BlockManager([GroupSpec(blocks, window, (0,))], size, prefix_caching=caching, watermark=0.0)


def tables(groups: int = 1) -> BlockTables:
    return BlockTables([[] for _ in range(groups)])


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    bm = manager()
    seq = tables()
    assert bm.needed(seq, 9, 0) == [3]                 # 9 slots of 4: three blocks
    bm.allocate(seq, 9, 0)
    assert len(seq.tables[0]) == 3 and bm.pools[0].num_free == 5
    assert bm.needed(seq, 12, 9) == [0]                # the third block has room up to slot 11
    assert bm.needed(seq, 13, 12) == [1]
    bm.free(seq)
    assert seq.tables[0] == [] and bm.pools[0].num_free == 8 and bm.stats()["used"] == 0


def test_can_allocate_counts_free_blocks_and_keeps_the_watermark_on_admission():
    bm = BlockManager([GroupSpec(100, None, (0,))], 4, watermark=0.05)
    assert bm.can_allocate([95]) and bm.can_allocate([95], admitting=True)
    assert not bm.can_allocate([96], admitting=True) and bm.can_allocate([96])
    assert not bm.can_allocate([101])


def test_published_blocks_are_shared_by_reference_and_outlive_their_first_owner():
    bm = manager()
    a, b = tables(), tables()
    keys = [b"k0", b"k1"]
    bm.match_prefix(a, keys, 0, 8)
    bm.allocate(a, 9, 0)
    bm.publish(a, 8)                                   # slots 0..7 computed: both full blocks may be shared
    assert bm.lookup(keys, limit=100) == 2 and bm.lookup(keys, limit=7) == 1   # a limit in slots caps the hit
    bm.match_prefix(b, keys, 2, 8)
    assert b.tables[0] == a.tables[0][:2] and b.cached_tokens == 8
    assert bm.stats()["shared"] == 2 and bm.stats()["used"] == 3
    bm.free(a)
    assert bm.stats()["used"] == 2                     # b still holds the two shared blocks
    bm.free(b)
    assert bm.stats()["used"] == 0 and bm.lookup(keys, 100) == 2   # free, but still cached


def test_a_partly_computed_block_is_not_published():
    bm = manager()
    a = tables()
    bm.match_prefix(a, [b"k0", b"k1"], 0, 8)
    bm.allocate(a, 8, 0)
    bm.publish(a, 7)                                   # slot 7 is not computed yet
    assert bm.lookup([b"k0", b"k1"], 100) == 1


def test_cached_blocks_are_evicted_least_recently_used_first_and_only_when_needed():
    bm = manager(blocks=4)
    owners = []
    for key in (b"a", b"b", b"c"):
        t = tables()
        bm.match_prefix(t, [key], 0, 4)
        bm.allocate(t, 4, 0)
        bm.publish(t, 4)
        owners.append(t)
    for t in owners:                                   # freed in order a, b, c: a is the least recently used
        bm.free(t)
    assert all(bm.lookup([k], 4) == 1 for k in (b"a", b"b", b"c"))
    big = tables()
    bm.allocate(big, 8, 0)                             # two blocks: the uncached one first, then a's
    assert bm.lookup([b"a"], 4) == 0 and bm.lookup([b"b"], 4) == 1 and bm.lookup([b"c"], 4) == 1


def test_a_hit_on_a_free_cached_block_counts_against_free_memory():
    bm = manager(blocks=2)
    t = tables()
    bm.match_prefix(t, [b"a"], 0, 4)
    bm.allocate(t, 4, 0)
    bm.publish(t, 4)
    bm.free(t)
    assert bm.pools[0].num_free == 2
    assert bm.can_allocate([1], admitting=True, hits=[b"a"])
    assert not bm.can_allocate([2], admitting=True, hits=[b"a"])   # the hit block itself is one of the two free


def test_no_prefix_caching_with_a_sliding_window():
    bm = manager(window=6)
    assert not bm.prefix_caching and bm.lookup([b"a"], 100) == 0


def test_a_sliding_group_gives_back_blocks_its_window_left_behind():
    bm = manager(blocks=8, size=4, window=6)
    seq = tables()
    bm.allocate(seq, 12, 0)                            # slots 0..11: three blocks
    assert bm.stats()["used"] == 3
    bm.allocate(seq, 13, 12)                           # query 12 sees slots 7..12: blocks 0 (0..3) is gone
    assert seq.tables[0][0] == -1 and bm.stats()["used"] == 3
    bm.allocate(seq, 21, 20)                           # query 20 sees 15..20: blocks 0..2 gone, 3..5 held
    assert seq.tables[0][:3] == [-1, -1, -1] and bm.stats()["used"] == 3
    assert bm.needed(seq, 40, 39) == [2]               # far ahead: only the blocks the window still sees
    bm.free(seq)
    assert bm.stats()["used"] == 0


def test_a_prefill_chunk_far_past_the_window_skips_blocks_nobody_sees():
    bm = manager(blocks=8, size=4, window=4)
    seq = tables()
    bm.allocate(seq, 4, 0)
    bm.allocate(seq, 24, 20)                           # the chunk's first query (20) sees 17..20 and on
    assert seq.tables[0][:4] == [-1, -1, -1, -1] and len(seq.tables[0]) == 6
    assert bm.stats()["used"] == 2


@pytest.mark.parametrize("window, fits", [(None, False), (8, True)])
def test_fits_ever_is_the_whole_pool_or_the_window(window, fits):
    bm = manager(blocks=4, size=4, window=window)      # 16 slots in all
    assert bm.fits_ever(15, chunk=4)
    assert bm.fits_ever(1000, chunk=4) is fits         # a window bounds what a sequence holds at once
