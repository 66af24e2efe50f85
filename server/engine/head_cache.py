"""Keys/values of the static head of a task's prompt, computed once per task and reused by its requests.

A prompt-tuning row starts with T virtual tokens and often a fixed instruction: their keys and values are the same
for every request of the task, so the runner prefills them once, and later rows start after them exactly as a
prefix-tuning row starts after its prefix. An entry is checked token by token against each row, so a template
whose text merges with the input under BPE just reuses fewer tokens, never a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prompt_core.lru import ByteLRU


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
    """An LRU of heads under a byte budget (prompt_core.lru.ByteLRU; 0 disables caching)."""

    def __init__(self, budget_bytes: int):
        self._lru: ByteLRU[tuple[str, int], CachedHead] = ByteLRU(budget_bytes)

    @property
    def budget(self) -> int:
        return self._lru.budget_bytes

    def get(self, key: tuple[str, int], ids: list[int], virt: list[int]) -> CachedHead | None:
        """The entry when it matches this row token by token (a miss otherwise)."""
        return self._lru.get(key, accept=lambda entry: entry.matches(ids, virt))

    def put(self, key: tuple[str, int], entry: CachedHead) -> None:
        self._lru.put(key, entry)

    def discard(self, key: tuple[str, int]) -> None:
        """Drop an entry that no later request will use (the shared prompt of n choices, once they are in)."""
        self._lru.discard(key)

    def stats(self) -> dict[str, int]:
        lru = self._lru
        return {"hits": lru.hits, "misses": lru.misses, "evictions": lru.evictions,
                "resident_bytes": lru.resident_bytes, "entries": len(lru)}
