"""Prompt-store benchmark (not CI): start-up cost with 10,000 tasks vs an empty store, and tier-cache throughput
cycling 1,000 distinct tasks vs 8, measured in one run.

    .venv/bin/python -m scripts.bench_store [--tasks 10000] [--device cpu|cuda] [--keep DIR]

Why: the store must scale with metadata only (start-up time and RSS), and serving many distinct prompts must not fall
off a cliff (SGLang measured TTFT x160 cycling 16 adapters through 8 slots). The goal is a 1,000-vs-8 ratio >= 0.8.
Registration goes through PromptStore.create with fsync off (durability is not what is measured here).
Three throughput views: raw fetches (get + tensors; the 8-task baseline is cache-resident, so this is the harshest),
fetches with per-step batch assembly, and a serving-shaped loop on the default model that also reports the store's
own time per request (the ratio the store alone implies). `--fetches 0` skips the raw fetch part.
Dims are SmolLM2-135M's (D=576, 30 layers, 3 KV heads of 64) so tensor sizes are realistic; no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.common import REPO

FP = {"architecture": "LlamaForCausalLM", "hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
      "head_dim": 64, "vocab_size": 49152, "embedding_sha256": "0" * 64}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_open(root: str) -> None:
    """Run in a fresh process: RSS before/after opening the store and the open time, as JSON on stdout."""
    import torch  # noqa: F401  (imported before measuring, as a server would have it)

    from prompt_core.fingerprint import ModelFingerprint
    from prompt_store.store import PromptStore
    before = rss_mib()
    t0 = time.perf_counter()
    store = PromptStore(root, ModelFingerprint.from_dict(FP))
    ready = time.perf_counter() - t0
    print(json.dumps({"open_s": ready, "rss_before_mib": before, "rss_after_mib": rss_mib(),
                      "tasks": store.stats()["tasks"]}))


def measure_open(root: Path, repeats: int = 3) -> dict:
    """Best of a few fresh processes (the machine is shared; the minimum is the least disturbed)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child-open", str(root)], capture_output=True, text=True,
                             check=True, cwd=REPO)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["open_s"])
    best["rss_delta_mib"] = min(r["rss_after_mib"] - r["rss_before_mib"] for r in runs)
    return best


def register(root: Path, n: int) -> float:
    import torch

    from prompt_core.fingerprint import ModelFingerprint
    from prompt_core.spec import PromptSpec, PromptTensors
    from prompt_store.store import PromptStore, StoreConfig
    fp = ModelFingerprint.from_dict(FP)
    store = PromptStore(root, fp, config=StoreConfig(fsync=False))
    specs = {"pt": PromptSpec("prompt_tuning", 8), "pp": PromptSpec("p_tuning", 8, "<v:4> Q: {input} <v:4> A:"),
             "px": PromptSpec("prefix_tuning", 2)}
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(n):
        kind = "px" if i % 20 == 0 else ("pp" if i % 5 == 0 else "pt")
        if kind == "px":
            tensors = PromptTensors(prefix=torch.randn(30, 2, 3, 2, 64, generator=g))  # [L, 2, H_kv, T, Dh]
        else:
            tensors = PromptTensors(virtual=torch.randn(8, 576, generator=g))          # [T, D]
        store.create(f"task-{i:05d}", f"tenant-{i % 100:03d}", spec=specs[kind], tensors=tensors,
                     metadata={"description": f"benchmark task {i}", "visibility": "public" if i % 3 else "private"})
        if (i + 1) % 2000 == 0:
            print(f"  registered {i + 1}/{n} ({(i + 1) / (time.perf_counter() - t0):.0f}/s)", flush=True)
    return time.perf_counter() - t0


def fetch_rate(store, refs: list[str], fetches: int) -> float:
    """Fetches per second: resolve the ref and get device-ready tensors, as the engine does per request."""
    n = len(refs)
    t0 = time.perf_counter()
    for i in range(fetches):
        rec = store.get(refs[i % n], "tenant-000")
        t = store.tensors(rec)
        assert t.virtual is not None or t.prefix is not None
    return fetches / (time.perf_counter() - t0)


def batch_rate(store, refs: list[str], fetches: int, batch: int = 16) -> float:
    """Fetches per second when each batch of requests also assembles its virtual-token table on the device, as
    prompt_core.batch.build_prefill does (one cat per step): the engine-facing cost of serving from the tiers."""
    import torch
    n = len(refs)
    t0 = time.perf_counter()
    for start in range(0, fetches, batch):
        tables = []
        for i in range(start, start + batch):
            t = store.tensors(store.get(refs[i % n], "tenant-000"))
            if t.virtual is not None:
                tables.append(t.virtual)
        if tables:
            torch.cat(tables)
    return fetches / (time.perf_counter() - t0)


def serve_rate(store, lm, refs: list[str], batches: int, batch: int = 8) -> tuple[float, float]:
    """Requests per second of a serving-shaped loop on the default model: resolve, fetch through the tiers, plan,
    and run one batched prefill with prompt_core (what the engine does per step), cycling through `refs`."""
    import torch

    from prompt_core.batch import build_prefill
    from prompt_core.forward import hidden_states, last_logits, prefix_cache
    from prompt_core.layout import plan_row
    n = len(refs)
    in_store = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(batches):
            s0 = time.perf_counter()
            recs = [store.get(refs[(b * batch + i) % n], "tenant-000") for i in range(batch)]
            tens = [store.tensors(r) for r in recs]
            in_store += time.perf_counter() - s0
            plans = [plan_row(r.spec, lm.tokenizer, "The food was cold and the service slow.") for r in recs]
            width = max(p.prefix for p in plans)
            step, readout = build_prefill(plans, [width] * batch, [t.virtual for t in tens], lm.device, lm.dtype)
            cache = prefix_cache(lm.model, [t.prefix for t in tens], width)
            last_logits(lm.model, hidden_states(lm.model, step, cache), readout)
    return batches * batch / (time.perf_counter() - t0), in_store / (batches * batch)


def serving(root: Path, batches: int) -> dict:
    from prompt_core.fingerprint import ModelFingerprint
    from prompt_core.model import load_model
    from prompt_store.store import PromptStore
    lm = load_model(device="cpu", dtype="float32")
    store = PromptStore(root, ModelFingerprint.from_dict(FP), device=lm.device, dtype=lm.dtype)
    public = [r.id for r in store.list("tenant-000")]
    hot, many = public[:8], public[8:1008]
    fetch_rate(store, many, len(many))  # warm the tiers, as a server would be after its first minutes
    serve_rate(store, lm, hot, 1)       # warm the model
    hot_runs, many_runs = [], []
    for _ in range(2):
        hot_runs.append(serve_rate(store, lm, hot, batches))
        many_runs.append(serve_rate(store, lm, many, batches))
    (hot, hot_store), (many_, many_store) = max(hot_runs), max(many_runs)
    # The model dominates and this machine may be shared, so also derive the ratio the store alone would cause:
    # the hot loop's time per request plus the extra store time per request of the 1,000-task loop.
    implied = (1 / hot) / (1 / hot + max(0.0, many_store - hot_store))
    return {"hot": hot, "many": many_, "ratio": many_ / hot, "hot_store_us": hot_store * 1e6,
            "many_store_us": many_store * 1e6, "implied": implied}


def throughput(root: Path, device: str, fetches: int) -> list[dict]:
    import torch

    from prompt_core.fingerprint import ModelFingerprint
    from prompt_store.store import PromptStore, StoreConfig
    fp = ModelFingerprint.from_dict(FP)
    public = [r.key.split("@")[0] for r in PromptStore(root, fp).list("tenant-000")]
    hot, many = public[:8], public[8:1008]
    results = []
    scenarios = [
        ("default budgets (host 1 GiB, device 256 MiB), fp32", dict(), torch.float32),
        ("bf16 device, device tier holds ~100 of the 1,000", dict(device_budget_bytes=1_000_000), torch.bfloat16),
        ("tiny tiers: host ~50, device ~20 entries (disk reads)", dict(host_budget_bytes=1_000_000,
                                                                      device_budget_bytes=200_000), torch.float32),
    ]
    for name, cfg, dtype in scenarios:
        store = PromptStore(root, fp, device=device, dtype=dtype, config=StoreConfig(**cfg))
        cold_many = fetch_rate(store, many, len(many))     # first pass: every fetch reads disk
        hot_runs, many_runs, hot_b, many_b = [], [], [], []
        for _ in range(5):  # interleaved rounds; best of each, since the machine is shared and noisy
            hot_runs.append(fetch_rate(store, hot, fetches // 5))
            many_runs.append(fetch_rate(store, many, fetches // 5))
            hot_b.append(batch_rate(store, hot, fetches // 5))
            many_b.append(batch_rate(store, many, fetches // 5))
        rate_hot, rate_many = max(hot_runs), max(many_runs)
        st = store.stats()["tiers"]
        results.append({"scenario": name, "cold_1000_per_s": cold_many, "hot_8_per_s": rate_hot,
                        "cycle_1000_per_s": rate_many, "ratio": rate_many / rate_hot,
                        "batch_hot": max(hot_b), "batch_many": max(many_b), "batch_ratio": max(many_b) / max(hot_b),
                        "device_evictions": st["device"]["evictions"], "host_evictions": st["host"]["evictions"],
                        "disk_reads": st["disk"]["reads"]})
        store.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--fetches", type=int, default=20_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--serve-batches", type=int, default=2, help="batches of 8 per round of the serving loop; 0 skips")
    ap.add_argument("--keep", type=Path, default=None, help="reuse/keep this store directory")
    ap.add_argument("--child-open", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_open:
        child_open(args.child_open)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    empty, full = work / "empty", args.keep or work / "full"
    try:
        from prompt_core.fingerprint import ModelFingerprint
        from prompt_store.store import PromptStore
        PromptStore(empty, ModelFingerprint.from_dict(FP))
        if not (full / "tasks").is_dir() or not any((full / "tasks").iterdir()):
            print(f"registering {args.tasks} tasks in {full} ...", flush=True)
            secs = register(full, args.tasks)
            print(f"registered {args.tasks} tasks in {secs:.1f} s ({args.tasks / secs:.0f}/s, fsync off)")
        e, f = measure_open(empty), measure_open(full)
        print("\n== start-up (fresh process, store open only; best of 3) ==")
        print(f"empty store : open {e['open_s'] * 1000:8.1f} ms   RSS +{e['rss_delta_mib']:6.1f} MiB "
              f"(process {e['rss_after_mib']:.0f} MiB)")
        print(f"{f['tasks']:>5} tasks : open {f['open_s'] * 1000:8.1f} ms   RSS +{f['rss_delta_mib']:6.1f} MiB "
              f"(process {f['rss_after_mib']:.0f} MiB)")
        per_task_kib = (f['rss_delta_mib'] - e['rss_delta_mib']) * 1024 / max(f['tasks'], 1)
        per_task = sum(p.stat().st_size for p in (full / 'tasks').rglob('*.safetensors')) / max(f['tasks'], 1)
        print(f"per task    : {f['open_s'] / max(f['tasks'], 1) * 1e6:.0f} us to open, {per_task_kib:.1f} KiB of RSS "
              f"(tensor bytes on disk per task ~{per_task / 1024:.0f} KiB, not loaded)")
        print(f"\n== tier throughput on {args.device}: {args.fetches} fetches (get + tensors) per workload ==")
        for r in (throughput(full, args.device, args.fetches) if args.fetches else []):
            print(f"{r['scenario']}\n   8 tasks {r['hot_8_per_s']:9.0f}/s   "
                  f"1,000 tasks {r['cycle_1000_per_s']:9.0f}/s   "
                  f"ratio {r['ratio']:.2f}   (cold first pass {r['cold_1000_per_s']:.0f}/s; evictions device "
                  f"{r['device_evictions']}, host {r['host_evictions']}; disk reads {r['disk_reads']})\n"
                  f"   with batch assembly (16 per step + cat): 8 tasks {r['batch_hot']:9.0f}/s   1,000 tasks "
                  f"{r['batch_many']:9.0f}/s   ratio {r['batch_ratio']:.2f}")
        if args.serve_batches:
            r = serving(full, args.serve_batches)
            print(f"\n== serving-shaped loop on the default model (CPU): resolve + fetch + plan + one batched prefill "
                  f"of 8 ==\n   8 tasks {r['hot']:7.1f} req/s   1,000 tasks {r['many']:7.1f} req/s   "
                  f"ratio {r['ratio']:.2f} (measured; model-bound and noisy on a shared CPU)\n"
                  f"   store time per request (resolve + fetch): 8 tasks {r['hot_store_us']:.1f} us, 1,000 tasks "
                  f"{r['many_store_us']:.1f} us -> ratio implied by the store alone {r['implied']:.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
