"""One least-recently-used cache under a byte budget, for every cache of tensors: the prompt store's host and device
tiers (prompt_store/tiers.py).

Eviction is oldest-use first and stops as soon as the new entry fits. A pinned entry is never evicted (it still
counts toward the budget). An entry bigger than the whole budget is not cached (unless pinned) and evicts nothing.
Replacing a key drops its old value first, so a stale value never outlives a refused replacement.
Not thread-safe: the owner holds a lock where threads share it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    pinned: bool = False


class ByteLRU(Generic[K, V]):
    """Entries by key, least recently used evicted first while the resident bytes would pass `budget_bytes`.

    `size(value)` is an entry's byte count (default: its `nbytes`). Counters: hits, misses, evictions (entries pushed
    out by a put; removals by `discard` are not evictions), resident_bytes and pinned (entries)."""

    def __init__(self, budget_bytes: int, size: Callable[[V], int] = lambda v: v.nbytes):
        self.budget_bytes = budget_bytes
        self._size = size
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self.resident_bytes = self.pinned = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self._entries)

    def get(self, key: K, accept: Callable[[V], bool] | None = None) -> V | None:
        """The value, now the most recently used; None (a miss) when absent or when `accept(value)` is false."""
        entry = self._entries.get(key)
        if entry is None or (accept is not None and not accept(entry.value)):
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.value

    def put(self, key: K, value: V, pinned: bool = False) -> bool:
        """Insert as the most recently used, evicting the least recently used unpinned entries until it fits.
        False (not cached) when it cannot fit even with every unpinned entry gone. A replaced entry keeps its pin."""
        nbytes = self._size(value)
        old = self._pop(key)
        if old is not None:
            pinned = pinned or old.pinned
        if nbytes > self.budget_bytes and not pinned:
            return False
        need = self.resident_bytes + nbytes - self.budget_bytes
        if need > 0:
            victims = []
            for k, e in self._entries.items():  # oldest first; stops as soon as enough is freed
                if need <= 0:
                    break
                if not e.pinned:
                    victims.append(k)
                    need -= e.nbytes
            for k in victims:
                self._pop(k)
                self.evictions += 1
        if self.resident_bytes + nbytes > self.budget_bytes and not pinned:
            return False
        self._entries[key] = _Entry(value, nbytes, pinned)
        self.resident_bytes += nbytes
        self.pinned += pinned
        return True

    def set_pinned(self, key: K, pinned: bool) -> bool:
        """Pin or unpin a resident entry; False when it is not resident."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self.pinned += int(pinned) - int(entry.pinned)
        entry.pinned = pinned
        return True

    def discard(self, key: K) -> bool:
        """Drop one entry, pinned or not (not an eviction); False when it was not resident."""
        return self._pop(key) is not None

    def discard_where(self, match: Callable[[K], bool]) -> int:
        """Drop every entry whose key matches, pinned or not (not evictions); how many."""
        gone = [k for k in self._entries if match(k)]
        for k in gone:
            self._pop(k)
        return len(gone)

    def _pop(self, key: K) -> _Entry[V] | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.resident_bytes -= entry.nbytes
            self.pinned -= entry.pinned
        return entry
