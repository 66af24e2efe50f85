"""Lazy tensor loading through three tiers: disk -> host memory -> device, each an LRU with a byte budget.

Why: 10,000+ tasks cannot all live on the accelerator, but a hot set must be there without a disk read per request.
Entries are keyed by `id@version` plus the sha256 of the tensor file, so an evicted and reloaded entry is always the
same bytes and a re-upload can never be confused with its predecessor. Device entries are in the model's dtype and
the engine's layout (virtual [T, D], prefix [L, 2, H_kv, T, Dh]).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from prompt_core.lru import ByteLRU
from prompt_core.spec import PromptTensors

TierKey = tuple[str, str]  # (id@version, tensors sha256)


@dataclass
class TierStats:
    """Counters exported as metrics (the API turns these into Prometheus gauges/counters)."""
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    budget_bytes: int = 0
    entries: int = 0
    pinned: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class LRUTier:
    """One tier: an LRU with a byte budget (prompt_core.lru.ByteLRU). Pinned entries are never evicted (and still
    count toward the budget). Its counters read as TierStats.

    Not thread-safe by itself; TierCache holds the lock."""

    def __init__(self, name: str, budget_bytes: int):
        self.name = name
        self.entries: ByteLRU[Hashable, PromptTensors] = ByteLRU(budget_bytes)  # keys, least recently used first

    @property
    def budget_bytes(self) -> int:
        return self.entries.budget_bytes

    @property
    def stats(self) -> TierStats:
        lru = self.entries
        return TierStats(hits=lru.hits, misses=lru.misses, evictions=lru.evictions, resident_bytes=lru.resident_bytes,
                         budget_bytes=lru.budget_bytes, entries=len(lru), pinned=lru.pinned)

    def get(self, key: Hashable) -> PromptTensors | None:
        return self.entries.get(key)

    def put(self, key: Hashable, value: PromptTensors, pinned: bool = False) -> bool:
        """Insert, evicting least-recently-used unpinned entries until it fits. Returns False (not cached) if it
        cannot fit even after evicting everything unpinned."""
        return self.entries.put(key, value, pinned)

    def set_pinned(self, key: Hashable, pinned: bool) -> bool:
        return self.entries.set_pinned(key, pinned)

    def discard(self, match: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key matches (a deleted task); not counted as evictions."""
        return self.entries.discard_where(match)


@dataclass
class DiskStats:
    """The disk tier is the store itself: it never evicts, so its counters are reads, bytes read and failures."""
    reads: int = 0
    bytes_read: int = 0
    errors: int = 0
    resident_bytes: int = 0  # tensor bytes of all live tasks on disk (set by the store)

    def to_dict(self) -> dict:
        """Also under the LRU tiers' counter names, so one metrics loop covers all three tiers: a disk read is a
        hit (disk always has it), a failed read a miss, and disk never evicts."""
        return {**self.__dict__, "hits": self.reads, "misses": self.errors, "evictions": 0}


class TierCache:
    """disk -> host -> device. `get(key, load)` returns device-ready tensors, loading through the tiers as needed.

    load(key) must return fp32 CPU tensors read from disk and checked against the sha256 in the key."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 host_budget_bytes: int = 1 << 30, device_budget_bytes: int = 256 << 20) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.host = LRUTier("host", host_budget_bytes)
        self.dev = LRUTier("device", device_budget_bytes)
        self.disk = DiskStats()
        self._pins: set[TierKey] = set()
        self._lock = threading.Lock()
        self._pin_memory = self.device.type == "cuda"

    def get(self, key: TierKey, load: Callable[[TierKey], PromptTensors]) -> PromptTensors:
        with self._lock:
            hit = self.dev.get(key)
            if hit is not None:
                return hit
            host = self.host.get(key)
        if host is None:
            try:
                fresh = load(key)
            except Exception:
                with self._lock:
                    self.disk.errors += 1
                raise
            host = self._to_host(fresh)                                     # model dtype, CPU (pinned on CUDA)
            with self._lock:
                self.disk.reads += 1
                self.disk.bytes_read += fresh.nbytes
                self.host.put(key, host, pinned=key in self._pins)
        on_device = host.to(self.device, self.dtype)                          # shares storage on CPU
        with self._lock:
            self.dev.put(key, on_device, pinned=key in self._pins)
        return on_device

    def _to_host(self, t: PromptTensors) -> PromptTensors:
        host = t.to("cpu", self.dtype)
        if self._pin_memory:
            host = PromptTensors(*(None if x is None else x.pin_memory() for x in (host.virtual, host.prefix)))
        return host

    def pin(self, key: TierKey, load: Callable[[TierKey], PromptTensors] | None = None) -> None:
        """Keep this entry resident in host and device tiers (loading it now if `load` is given)."""
        with self._lock:
            self._pins.add(key)
            self.host.set_pinned(key, True)
            self.dev.set_pinned(key, True)
        if load is not None:
            self.get(key, load)

    def unpin(self, key: TierKey) -> None:
        with self._lock:
            self._pins.discard(key)
            self.host.set_pinned(key, False)
            self.dev.set_pinned(key, False)

    def discard_task(self, key: str) -> int:
        """Drop a deleted version ("id@N") or every version of a deleted task ("id@"), pinned or not."""
        match = lambda k: k[0] == key or (key.endswith("@") and k[0].startswith(key))  # noqa: E731
        with self._lock:
            self._pins = {k for k in self._pins if not match(k)}
            return self.host.discard(match) + self.dev.discard(match)

    def stats(self) -> dict:
        with self._lock:
            return {"disk": self.disk.to_dict(), "host": self.host.stats.to_dict(),
                    "device": self.dev.stats.to_dict()}
