"""Tiers: LRU eviction under tiny budgets, pinning, preload, counters, and never a wrong tensor after reload."""

from __future__ import annotations

import random

import pytest
import torch

from prompt_core.spec import PromptSpec, PromptTensors
from prompt_store.tiers import LRUTier, TierCache

PT = PromptSpec("prompt_tuning", 4)
ENTRY = 4 * 64 * 4  # one [4, 64] fp32 prompt


def vt(seed: float) -> PromptTensors:
    return PromptTensors(virtual=torch.full((4, 64), float(seed)))


def test_lru_tier_evicts_least_recent_and_respects_pins():
    tier = LRUTier("host", budget_bytes=3 * ENTRY)
    for k in "abc":
        assert tier.put(k, vt(ord(k)))
    assert tier.get("a") is not None  # a is now most recent
    tier.put("d", vt(1))               # evicts b
    assert tier.get("b") is None and tier.stats.evictions == 1
    tier.set_pinned("c", True)
    tier.put("e", vt(2))               # c pinned: evicts a (least recent unpinned)
    assert set(tier.entries) == {"c", "d", "e"}
    assert tier.stats.resident_bytes == 3 * ENTRY and tier.stats.pinned == 1
    assert not tier.put("huge", PromptTensors(virtual=torch.zeros(100, 64)))  # bigger than the budget: not cached
    assert tier.stats.resident_bytes == 3 * ENTRY
    assert (tier.stats.hits, tier.stats.misses) == (1, 1)


def test_store_eviction_tiny_budget_never_serves_a_wrong_tensor(make_store):
    """60 tasks with 1-3 versions each (120 keys) through tiers that hold 3 (host) and 2 (device) entries, in random
    order:
    every fetch equals the ground truth, and evictions really happened."""
    s = make_store(host_budget_bytes=3 * ENTRY, device_budget_bytes=2 * ENTRY)
    truth = {}
    for i in range(60):
        for v in range(1 + i % 3):  # re-uploads: id@1 and id@2 must never be confused
            seed = i * 10 + v
            r = s.create(f"t{i}", "alice", spec=PT, tensors=vt(seed))
            truth[r.key] = seed
    keys = list(truth)
    rng = random.Random(0)
    for _ in range(600):
        key = rng.choice(keys)
        t = s.tensors(s.get(key, "alice")).virtual
        assert t.shape == (4, 64) and bool((t == truth[key]).all()), key
    st = s.stats()["tiers"]
    assert st["device"]["evictions"] > 400 and st["host"]["evictions"] > 300
    assert st["device"]["resident_bytes"] <= 2 * ENTRY and st["host"]["resident_bytes"] <= 3 * ENTRY
    assert st["disk"]["reads"] == st["host"]["misses"]
    assert st["device"]["hits"] + st["device"]["misses"] == 600


def test_delete_then_recreate_same_id_gets_new_bytes(make_store):
    s = make_store()
    r1 = s.create("t", "alice", spec=PT, tensors=vt(1))
    assert float(s.tensors(r1).virtual[0, 0]) == 1.0
    s.delete("t", "alice")
    r2 = s.create("t", "alice", spec=PT, tensors=vt(2))
    assert float(s.tensors(s.get("t", "alice")).virtual[0, 0]) == 2.0
    assert r1.tier_key != r2.tier_key


def test_pin_and_preload(make_store):
    s = make_store(host_budget_bytes=2 * ENTRY, device_budget_bytes=2 * ENTRY)
    for i in range(5):
        s.create(f"t{i}", "alice", spec=PT, tensors=vt(i))
    s2 = type(s)(s.root, s.fingerprint, config=type(s.config)(host_budget_bytes=2 * ENTRY,
                                                               device_budget_bytes=2 * ENTRY, pin=["t0"],
                                                               preload=["t1"]))
    st = s2.stats()["tiers"]
    assert st["device"]["pinned"] == 1 and st["device"]["entries"] == 2 and st["disk"]["reads"] == 2
    for i in range(2, 5):
        s2.tensors(s2.get(f"t{i}", None))
    reads = s2.stats()["tiers"]["disk"]["reads"]
    assert float(s2.tensors(s2.get("t0", None)).virtual[0, 0]) == 0.0  # pinned: still resident
    assert s2.stats()["tiers"]["disk"]["reads"] == reads
    s2.tiers.unpin(s2.get("t0", None).tier_key)
    assert s2.stats()["tiers"]["device"]["pinned"] == 0


def test_device_tier_layout_and_dtype(make_store, tiny_fp, tmp_path):
    from prompt_store.store import PromptStore
    s = make_store()
    prefix = torch.randn(2, 2, 2, 3, 16)  # [L, 2, H_kv, T, Dh]
    r = s.create("p", "alice", spec=PromptSpec("prefix_tuning", 3), tensors=PromptTensors(prefix=prefix))
    s16 = PromptStore(s.root, tiny_fp, dtype=torch.bfloat16)
    t = s16.tensors(s16.get("p", None))
    assert t.prefix.dtype == torch.bfloat16 and t.prefix.shape == (2, 2, 2, 3, 16) and t.virtual is None
    assert torch.equal(t.prefix, prefix.bfloat16())
    assert s16.stats()["tiers"]["device"]["resident_bytes"] == prefix.numel() * 2
    assert torch.equal(s.host_tensors(r).prefix, prefix)  # fp32 from disk, exact


def test_hard_prompt_has_no_tensors(make_store):
    s = make_store()
    r = s.create("h", None, spec=PromptSpec("hard", 0, "Q: {input}\nA:"))
    t = s.tensors(r)
    assert t.virtual is None and t.prefix is None
    assert s.stats()["tiers"]["disk"]["reads"] == 0


def test_tier_cache_load_error_counts_and_propagates():
    cache = TierCache(host_budget_bytes=ENTRY * 4, device_budget_bytes=ENTRY * 4)

    def bad(_key):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        cache.get(("x@1", "s"), bad)
    assert cache.stats()["disk"]["errors"] == 1 and cache.stats()["host"]["entries"] == 0
