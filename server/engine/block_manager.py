"""Key/value memory in fixed blocks: free lists, per-sequence block tables, reference counts, a prefix cache.
Pure Python: the scheduler asks it before admitting or growing a sequence, and the model runner only turns the
tables it keeps into the slot mapping and the table the attention kernel reads.

Layers are grouped by attention window (one group for most models; full and sliding layers apart otherwise), and
each group has a pool of its own. A block holds `block_size` consecutive slots of one sequence for every layer of
its group. A sliding group keeps only the blocks its window can still see: once a sequence's next query is past a
block by the window, the block goes back to the pool.

Prefix cache (only when every layer attends fully, as transformers' paged cache also does): a block that is full
of prompt tokens gets a key, a hash chained from the previous block's key over the block's token descriptors.
The first key of a chain is the task's prompt key, so two tasks never share a block (even with identical token
text and different soft prompts), and a block holding any of a request's own input is also keyed by its tenant,
so one tenant's text is never served from (or timed against) another's cache. A task's static head (prefix-tuning
key/values, prompt-tuning and P-tuning virtual tokens, the fixed template text) is therefore shared by all its
requests. A freed block keeps its key and contents and waits in the free queue, least recently used first, so
cached blocks cost nothing until the pool needs them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable


@dataclass
class GroupSpec:
    """One pool of blocks: the layers that share a window (None: full attention)."""
    num_blocks: int
    window: int | None = None
    layers: tuple[int, ...] = ()


@dataclass
class BlockTables:
    """A sequence's blocks: per group, the physical block of each logical block (-1 once a window freed it)."""
    tables: list[list[int]]
    cached_tokens: int = 0          # leading slots served from the prefix cache at admission
    keys: list[Hashable] = field(default_factory=list)   # keys of its full prompt blocks, in order
    registered: int = 0             # how many of those keys this sequence has published


class BlockPool:
    """The blocks of one group: reference counts, the free queue (least recently used first) and cached keys."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.key: list[Hashable | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[Hashable, int] = {}
        self.hits = 0      # blocks found in the cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        """A free block, evicting the least recently used cached one."""
        block, _ = self.free.popitem(last=False)
        if self.key[block] is not None:
            del self.cached[self.key[block]]
            self.key[block] = None
        self.ref[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None            # cached blocks wait at the back: evicted last
            if self.key[block] is None:
                self.free.move_to_end(block, last=False)

    def publish(self, block: int, key: Hashable) -> None:
        """The block is full of tokens whose key/values depend only on `key`: later sequences may reuse it."""
        if key not in self.cached and self.key[block] is None:
            self.cached[key] = block
            self.key[block] = key

    def used(self) -> int:
        return self.num_blocks - len(self.free)

    def shared(self) -> int:
        return sum(1 for r in self.ref if r > 1)


class BlockManager:
    def __init__(self, groups: list[GroupSpec], block_size: int, prefix_caching: bool = True,
                 watermark: float = 0.01):
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.groups = groups
        self.block_size = block_size
        self.pools = [BlockPool(g.num_blocks) for g in groups]
        # prefix caching needs every layer to keep every block (a sliding group frees what it can no longer see)
        self.prefix_caching = prefix_caching and all(g.window is None for g in groups)
        # admissions leave this many blocks free, so running sequences can grow without preempting at once
        self.watermark = [int(watermark * g.num_blocks) for g in groups]
        self.queries = 0   # prompt tokens looked up in the prefix cache
        self.hits = 0      # of those, tokens served from it

    # ---- sizes
    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.block_size)

    def max_slots(self, group: int) -> int:
        """The most slots one sequence can ever hold live in a group (a window bounds a sliding group)."""
        return self.groups[group].num_blocks * self.block_size

    def fits_ever(self, slots: int, chunk: int) -> bool:
        """Whether a sequence of `slots` slots, prefilled `chunk` queries at a time, fits in the empty pools."""
        for spec in self.groups:
            need = self.blocks_for(slots)
            if spec.window is not None:  # the window and one chunk, which may straddle one more block
                need = min(need, self.blocks_for(spec.window + chunk) + 1)
            if need > spec.num_blocks:
                return False
        return True

    # ---- admission
    def lookup(self, keys: list[Hashable], limit: int) -> int:
        """How many leading `keys` the cache holds, covering at most `limit` slots (no side effect)."""
        if not self.prefix_caching:
            return 0
        cached = self.pools[0].cached
        n = 0
        for key in keys[: limit // self.block_size]:
            if key not in cached:
                break
            n += 1
        return n

    def match_prefix(self, seq: BlockTables, keys: list[Hashable], hit: int, prompt_slots: int) -> None:
        """Admit a sequence with empty tables: take the first `hit` cached blocks of its `keys` (see lookup)."""
        seq.keys = list(keys)
        pool = self.pools[0]
        for key in keys[:hit]:
            block = pool.cached[key]
            pool.share(block)
            seq.tables[0].append(block)
        pool.hits += hit
        seq.registered = hit
        seq.cached_tokens = hit * self.block_size
        if self.prefix_caching:
            self.queries += prompt_slots
            self.hits += seq.cached_tokens

    def needed(self, seq: BlockTables, upto: int, first_query: int) -> list[int]:
        """New blocks each group needs so that slots [0, upto) are held (a sliding group: only those the query
        at `first_query` and later ones can still see)."""
        out = []
        for g, spec in enumerate(self.groups):
            start = len(seq.tables[g])
            if spec.window is not None:
                start = max(start, self._expired(g, first_query))
            out.append(max(0, self.blocks_for(upto) - start))
        return out

    def can_allocate(self, needed: list[int], admitting: bool = False, hits: list[Hashable] = ()) -> bool:
        """Whether `needed` new blocks per group are free (beyond the watermark when admitting); cached blocks a
        new sequence takes (`hits`) that sit in the free queue count against it too."""
        reserve = self.watermark if admitting else [0] * len(self.pools)
        taken = [0] * len(self.pools)
        if hits:
            pool = self.pools[0]
            taken[0] = sum(1 for key in hits if pool.ref[pool.cached[key]] == 0)
        return all(n + r + h <= p.num_free for n, r, h, p in zip(needed, reserve, taken, self.pools))

    def allocate(self, seq: BlockTables, upto: int, first_query: int) -> None:
        """Hold slots [0, upto): append blocks to every group's table; a sliding group first frees the blocks the
        query at `first_query` (and every later one) can no longer see."""
        for g, spec in enumerate(self.groups):
            table, pool = seq.tables[g], self.pools[g]
            if spec.window is not None:
                self._expire(g, table, first_query)
            while len(table) < self.blocks_for(upto):
                if spec.window is not None and len(table) < self._expired(g, first_query):
                    table.append(-1)  # never seen by any query this sequence still runs
                else:
                    table.append(pool.take())

    def publish(self, seq: BlockTables, computed: int) -> None:
        """Offer the sequence's full prompt blocks whose slots are all computed (< `computed`) to later requests."""
        if not self.prefix_caching:
            return
        pool = self.pools[0]
        full = min(len(seq.keys), computed // self.block_size)
        for j in range(seq.registered, full):
            pool.publish(seq.tables[0][j], seq.keys[j])
        seq.registered = max(seq.registered, full)

    def free(self, seq: BlockTables) -> None:
        for g, table in enumerate(seq.tables):
            pool = self.pools[g]
            for block in reversed(table):  # the tail first: a chain's head stays cached longest
                if block >= 0:
                    pool.release(block)
            table.clear()
        seq.registered = 0
        seq.cached_tokens = 0

    # ---- windows
    def _expired(self, group: int, first_query: int) -> int:
        """Leading logical blocks no query from slot `first_query` on can see in a sliding group."""
        window = self.groups[group].window
        lowest = first_query - window + 1          # the oldest slot that query still sees
        return max(0, lowest // self.block_size)

    def _expire(self, group: int, table: list[int], first_query: int) -> None:
        pool = self.pools[group]
        for j in range(min(self._expired(group, first_query), len(table))):
            if table[j] >= 0:
                pool.release(table[j])
                table[j] = -1

    # ---- numbers
    def stats(self) -> dict[str, int]:
        return {"blocks": sum(p.num_blocks for p in self.pools), "used": sum(p.used() for p in self.pools),
                "shared": sum(p.shared() for p in self.pools), "free": sum(p.num_free for p in self.pools),
                "cached": sum(len(p.cached) for p in self.pools)}
