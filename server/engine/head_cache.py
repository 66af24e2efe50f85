"""Keys/values of the static head of a task's prompt, computed once per task and reused by its requests.

A prompt-tuning row starts with T virtual tokens and often a fixed instruction: their keys and values are the same
for every request of the task, so the runner prefills them once, and later rows start after them exactly as a
prefix-tuning row starts after its prefix. An entry is checked token by token against each row, so a template
whose text merges with the input under BPE just reuses fewer tokens, never a wrong one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachedHead:
    ids: tuple[int, ...]    # the head's token ids (0 at virtual tokens)
    virt: tuple[int, ...]   # the head's virtual-token indices (-1 at real tokens)
    kv: torch.Tensor        # [L, 2, H_kv, P + k, Dh]: the task's prefix (if any), then the head's keys/values

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def matches(self, ids: list[int], virt: list[int]) -> bool:
        k = len(self.ids)
        return tuple(ids[:k]) == self.ids and tuple(virt[:k]) == self.virt


class HeadCache:
    """An LRU of heads under a byte budget (0 disables caching)."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple[str, int], CachedHead] = OrderedDict()
        self.resident_bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: tuple[str, int], ids: list[int], virt: list[int]) -> CachedHead | None:
        entry = self._entries.get(key)
        if entry is None or not entry.matches(ids, virt):
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple[str, int], entry: CachedHead) -> None:
        if entry.nbytes > self.budget:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.resident_bytes -= old.nbytes
        while self._entries and self.resident_bytes + entry.nbytes > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.resident_bytes -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = entry
        self.resident_bytes += entry.nbytes

    def discard(self, key: tuple[str, int]) -> None:
        """Drop an entry that no later request will use (the shared prompt of n choices, once they are in)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.resident_bytes -= old.nbytes

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "resident_bytes": self.resident_bytes, "entries": len(self._entries)}
