"""A second process for the store tests: `python -m tests.prompt_store.store_worker MODE ROOT FP_JSON ...`.

Modes:
  hang-before-publish ID   create ID but stop just before the publishing rename (the parent kills it there)
  create-loop ID N [BASE]  create N versions of ID as fast as possible (concurrency, random kills)
  replica                  poll the store; create "from-b"; report when "from-a" appears and then disappears
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import PromptSpec, PromptTensors
from prompt_store.store import PromptStore, StoreConfig


def tensors(seed: int) -> PromptTensors:
    return PromptTensors(virtual=torch.full((4, 64), float(seed)))


def main() -> None:
    mode, root, fp_json = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    fp = ModelFingerprint.from_dict(json.loads(fp_json))
    spec = PromptSpec("prompt_tuning", 4)
    if mode == "hang-before-publish":
        store = PromptStore(root, fp)

        def hang() -> None:
            (root / "READY_TO_PUBLISH").write_text("1")
            time.sleep(120)

        store._before_publish = hang
        store.create(sys.argv[4], "alice", spec=spec, tensors=tensors(99))
    elif mode == "create-loop":
        store = PromptStore(root, fp)
        base = int(sys.argv[6]) if len(sys.argv) > 6 else 1000
        for i in range(int(sys.argv[5])):
            store.create(sys.argv[4], "alice", spec=spec, tensors=tensors(base + i))
            print("created", flush=True)
    elif mode == "replica":
        store = PromptStore(root, fp, config=StoreConfig(poll_interval_s=0.2), poll=True)
        store.create("from-b", "bob", spec=spec, tensors=tensors(2), metadata={"visibility": "public"})
        print("created from-b", flush=True)
        deadline = time.time() + 20
        while time.time() < deadline and "from-a" not in {r.id for r in store.list(None)}:
            time.sleep(0.05)
        rec = store.get("from-a", None)
        print("saw from-a", float(store.tensors(rec).virtual[0, 0]), flush=True)
        while time.time() < deadline and "from-a" in {r.id for r in store.list(None)}:
            time.sleep(0.05)
        print("from-a gone" if "from-a" not in {r.id for r in store.list(None)} else "still there", flush=True)
        store.close()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
