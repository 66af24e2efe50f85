"""The one byte-budget LRU (prompt_core/lru.py) under the store's tiers: which entry goes
first, that the budget always holds, what an entry bigger than the budget does, and what pins change."""

from __future__ import annotations

from dataclasses import dataclass

from prompt_core.lru import ByteLRU


@dataclass
class Blob:
    nbytes: int
    tag: str = ""


def test_evicts_least_recently_used_first_and_only_what_it_must():
    lru = ByteLRU(100)
    for k in "abcd":
        assert lru.put(k, Blob(25))
    assert lru.get("a") is not None               # a is now the most recent: b is the oldest
    assert lru.put("e", Blob(40))                 # 40 more bytes: b and c go, d stays
    assert list(lru) == ["d", "a", "e"] and lru.evictions == 2
    assert lru.resident_bytes == 90 <= lru.budget_bytes
    assert (lru.hits, lru.misses) == (1, 0)
    assert lru.get("b") is None and lru.misses == 1


def test_budget_holds_under_any_sequence():
    lru = ByteLRU(1000)
    for i in range(500):
        lru.put(i % 37, Blob(1 + (i * 7919) % 400))
        if i % 3 == 0:
            lru.get((i * 13) % 37)
        assert lru.resident_bytes == sum(lru._entries[k].nbytes for k in lru) <= 1000


def test_an_entry_bigger_than_the_budget_is_not_cached_and_evicts_nothing():
    lru = ByteLRU(100)
    lru.put("a", Blob(60))
    assert not lru.put("huge", Blob(101))
    assert list(lru) == ["a"] and lru.evictions == 0 and lru.resident_bytes == 60
    assert not lru.put("a", Blob(101))            # a refused replacement drops the old value: never a stale one
    assert len(lru) == 0 and lru.resident_bytes == 0


def test_pinned_entries_are_never_evicted_and_count_toward_the_budget():
    lru = ByteLRU(100)
    lru.put("p", Blob(50), pinned=True)
    lru.put("a", Blob(30))
    assert lru.put("b", Blob(40))                 # evicts a, not the older pinned p
    assert list(lru) == ["p", "b"] and lru.pinned == 1
    assert not lru.put("c", Blob(60)) and "c" not in lru and "p" in lru  # 50 pinned + 60 > 100: refused
    assert lru.set_pinned("p", False) and lru.pinned == 0
    assert lru.put("c", Blob(60)) and "p" not in lru  # unpinned, p goes like any other
    assert lru.put("big", Blob(150), pinned=True)  # a pinned entry is kept even over the budget
    assert list(lru) == ["big"] and lru.resident_bytes == 150 and lru.pinned == 1
    assert lru.put("big", Blob(150))              # a replacement keeps its pin
    assert lru.pinned == 1 and lru.resident_bytes == 150


def test_discard_is_not_an_eviction():
    lru = ByteLRU(100)
    for k in ("t@1", "t@2", "u@1"):
        lru.put(k, Blob(10), pinned=k == "t@2")
    assert lru.discard_where(lambda k: k.startswith("t@")) == 2
    assert lru.discard("u@1") and not lru.discard("u@1")
    assert (len(lru), lru.resident_bytes, lru.pinned, lru.evictions) == (0, 0, 0, 0)


def test_a_refused_match_is_a_miss_and_does_not_refresh():
    lru = ByteLRU(100)
    lru.put("a", Blob(50, "x"))
    lru.put("b", Blob(50, "y"))
    assert lru.get("a", accept=lambda v: v.tag == "z") is None and lru.misses == 1
    lru.put("c", Blob(50))                        # a was not refreshed by the refused get: a goes
    assert list(lru) == ["b", "c"]
