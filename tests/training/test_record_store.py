"""training/record_store.py: the record store that fine-tuning jobs and batches share (model-free)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from training.record_store import RecordStore, orphaned


class Missing(LookupError):
    pass


@dataclass
class Item:
    id: str
    tenant: str
    created: float
    count: int = 0
    lease_owner: str | None = None
    lease_until: float = 0.0


class ItemStore(RecordStore[Item]):
    folder, record_name, id_prefix, record = "items", "item.json", "item-", Item
    not_found, what, created_field = Missing, "item", "created"


def publish(store: ItemStore, rec: Item) -> Item:
    stage = store.staging / f"stage-{rec.id}"
    stage.mkdir()
    store._stage_record(stage, rec)
    os.rename(stage, store.dir / rec.id)
    return rec


def test_records_are_private_to_their_tenant_and_listed_newest_first(tmp_path):
    store = ItemStore(tmp_path)
    for i, tenant in enumerate(("a", "b", "a")):
        publish(store, Item(f"item-{i}", tenant, created=100.0 + i))
    assert [r.id for r in store.list()] == ["item-2", "item-1", "item-0"]
    assert [r.id for r in store.list("a", admin=False)] == ["item-2", "item-0"]
    assert [r.id for r in store.oldest_first()] == ["item-0", "item-1", "item-2"]
    assert store.get("item-1", "b", admin=False).tenant == "b"
    with pytest.raises(Missing, match="no item 'item-1'"):
        store.get("item-1", "a", admin=False)           # another tenant's record reads as missing


@pytest.mark.parametrize("bad", ["../items/item-0", "item-0/../item-0", "other-0", "", None])
def test_ids_outside_the_prefix_or_folder_are_never_read(tmp_path, bad):
    store = ItemStore(tmp_path)
    publish(store, Item("item-0", "a", created=1.0))
    with pytest.raises(Missing):
        store.get(bad)


def test_updates_are_read_modify_write_under_one_lock(tmp_path):
    store = ItemStore(tmp_path)
    publish(store, Item("item-0", "a", created=1.0))

    def bump(r: Item) -> None:
        seen = r.count
        time.sleep(0.001)                                # a lost update would show if two writers interleaved
        r.count = seen + 1

    threads = [threading.Thread(target=lambda: [store.update("item-0", bump) for _ in range(20)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("item-0").count == 80
    assert not list(store.staging.iterdir())             # no temporary file left behind


def test_a_lease_is_orphaned_when_it_expires_or_its_process_is_gone():
    host, now = socket.gethostname(), time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = Item("item-0", "a", 0.0, lease_owner=f"{host}:{os.getppid()}:r", lease_until=now + 60)
    assert not orphaned(live, now)
    assert orphaned(Item("item-0", "a", 0.0, lease_owner=f"{host}:{os.getppid()}:r", lease_until=now - 1), now)
    assert orphaned(Item("item-0", "a", 0.0, lease_owner=f"{host}:{dead.pid}:r", lease_until=now + 60), now)
    other_host = Item("item-0", "a", 0.0, lease_owner=f"elsewhere:{dead.pid}:r", lease_until=now + 60)
    assert not orphaned(other_host, now)                 # another host's process cannot be checked from here
