"""Key/value memory of the paged cache, measured on the engine in-process, beside what the slot cache it replaced
allocated for the same running rows (its rule: one [rows, slots] buffer per layer, rows and slots each doubling from
8 and 256 to the batch and the longest row's prompt + max_new_tokens; computed, since that code is gone).

    python -m scripts.bench_kv                       # both workloads, default model, the served dtype
    python -m scripts.bench_kv --budget-mb 256       # also: the most rows running under a fixed budget
    python -m scripts.bench_kv --http --budget-mb 256  # the HTTP burst: 64 requests of ~1,500 tokens

Workloads: `mixed` (60 chat-sized requests of 20-200 input and 32-256 new tokens, 4 documents of 1,500 tokens with
512 new tokens) and `serving` (96 requests, 512 input tokens +-90%, 192 new tokens +-90%, as the serving benchmark).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts.common import REPO, ServerProcess, command_line, load_avg

MIB = 1 << 20


def texts(tok, n_tokens: int, rng: random.Random) -> str:
    """Text of about n_tokens tokens: random words from the vocabulary, decoded."""
    ids = [rng.randrange(1000, 40000) for _ in range(n_tokens)]
    text = tok.decode(ids, skip_special_tokens=True)
    return tok.decode(tok.encode(text, add_special_tokens=False)[:n_tokens])


def workload(name: str, tok, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    if name == "mixed":
        out = [(texts(tok, rng.randint(20, 200), rng), rng.randint(32, 256)) for _ in range(60)]
        return out + [(texts(tok, 1500, rng), 512) for _ in range(4)]
    return [(texts(tok, max(1, int(512 * rng.uniform(0.1, 1.9))), rng), max(1, int(192 * rng.uniform(0.1, 1.9))))
            for _ in range(96)]


def slot_cache_bytes(seqs, per_slot: int) -> int:
    """What the slot cache held for these running rows."""
    grow = lambda have, need: have if need <= have else max(need, 2 * have)  # noqa: E731
    rows, slots = 8, 256
    rows = grow(rows, len(seqs))
    slots = grow(slots, max(s.plan.prefix + s.plan.num_queries + s.request.sampling.max_new_tokens for s in seqs))
    return rows * slots * per_slot


def run_engine(loaded, items, budget_mb: int, max_batch: int) -> dict:
    from prompt_core.spec import PromptKind, PromptSpec
    from server.engine.config import EngineConfig, SchedulerConfig
    from server.engine.engine import LLMEngine
    from server.engine.request import EngineRequest, PromptRef, SamplingParams

    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=max_batch),
                                            kv_cache_bytes=budget_mb * MIB, max_new_tokens=1024))
    ref = PromptRef("bench@1", PromptSpec(PromptKind.HARD, 0, "{input}"))
    for i, (text, new) in enumerate(items):
        engine.add_request(EngineRequest(f"r{i}", ref, text, sampling=SamplingParams(max_new_tokens=new,
                                                                                    temperature=0.0,
                                                                                    ignore_eos=True)))
    B = engine.blocks.block_size
    per_slot = engine.cache.shape.block_bytes(len(engine.cache.keys)) // B
    peak = {"used_bytes": 0, "held_tokens": 0, "rows": 0, "slot_cache_bytes": 0, "ratio_at_peak": 0.0}
    ratios, steps, t0 = [], 0, time.perf_counter()
    while engine.has_work():
        engine.step()
        steps += 1
        running = engine.scheduler.running
        if not running:
            continue
        blocks, held = set(), 0
        for s in running:  # every live slot once (a shared block counts once)
            live = s.plan.prefix + s.computed
            for j, b in enumerate(s.blocks.tables[0]):
                if b >= 0 and b not in blocks:
                    blocks.add(b)
                    held += min(B, max(0, live - j * B))
        used = engine.kv_stats()["used_bytes"]
        ratios.append(used / max(1, held * per_slot))
        if used > peak["used_bytes"]:
            peak.update(used_bytes=used, held_tokens=held, ratio_at_peak=used / max(1, held * per_slot))
        peak["rows"] = max(peak["rows"], len(running))
        peak["slot_cache_bytes"] = max(peak["slot_cache_bytes"], slot_cache_bytes(running, per_slot))
    st = engine.kv_stats()
    return {"budget_bytes": engine.cache.bytes(), "per_token_bytes": per_slot, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1), "max_used_over_held": max(ratios),
            "preempted": {k.removeprefix("preempted_"): v for k, v in st.items() if k.startswith("preempted_")},
            **peak}


def rows_that_fit(items_slots: list[int], budget: int, per_slot: int) -> int:
    """The slot cache's rows under a budget: every row pays for the longest one (doubled from 256 slots)."""
    slots = 256
    while slots < max(items_slots):
        slots *= 2
    return budget // (slots * per_slot)


def http_burst(budget_mb: int, n: int, tokens: int, new: int) -> dict:
    """64 requests of ~1,500 tokens at once over HTTP against a server with a small --kv-cache-mb."""
    import tempfile

    from transformers import AutoTokenizer

    from prompt_core.model import ensure_default_model_dir

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model_dir()))
    rng = random.Random(1)
    prompts = [texts(tok, tokens, rng) for _ in range(n)]
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(Path(store), "--kv-cache-mb", str(budget_mb), "--max-batch-size", "64",
                               env={"PROMPTSERVE_DTYPE": "auto"}, start_timeout_s=300)
        try:
            status = Path(f"/proc/{server.pid}/status")
            rss = lambda key: int(next(x for x in status.read_text().splitlines() if x.startswith(key)).split()[1])  # noqa: E731
            with server.client(timeout=3600) as c:
                ready = c.get("/ready").json()
                base = rss("VmRSS:")
                t0 = time.perf_counter()

                def one(p):
                    r = c.post("/v1/completions", json={"model": "default", "prompt": p, "max_tokens": new,
                                                        "temperature": 0, "ignore_eos": True})
                    return r.status_code

                with ThreadPoolExecutor(n) as pool:
                    codes = list(pool.map(one, prompts))
                elapsed = time.perf_counter() - t0
                peak = rss("VmHWM:")
                metrics = c.get("/metrics").text
        finally:
            server.close()
    pre = sum(float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("promptserve_preemptions_total{"))
    growth = (peak - base) * 1024
    return {"requests": n, "prompt_tokens_each": tokens, "new_tokens": new, "budget_bytes": ready["kv_cache_bytes"],
            "dtype": ready["dtype"], "status_counts": {str(k): codes.count(k) for k in sorted(set(codes))},
            "rss_ready_bytes": base * 1024, "rss_peak_bytes": peak * 1024, "rss_growth_bytes": growth,
            "growth_over_budget": growth / ready["kv_cache_bytes"], "preemptions": pre, "seconds": round(elapsed, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mixed,serving")
    p.add_argument("--budget-mb", type=int, default=0, help="also run under this budget (0: the default budget only)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--http", action="store_true", help="the HTTP burst instead of the in-process workloads")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "raw" / "kv_cache.json")
    args = p.parse_args()
    run = {"command": command_line(), "load_avg": load_avg(), "when": time.strftime("%Y-%m-%d %H:%M")}
    if args.http:  # kept beside the in-process results, with its own command line and time
        res = {"http_burst": {**run, **http_burst(args.budget_mb or 256, 64, 1500, 32)}}
        print(json.dumps(res["http_burst"], indent=1))
    else:
        res = run
        from prompt_core.model import load_model

        loaded = load_model(dtype=args.dtype, serving=True)
        res["dtype"] = str(loaded.dtype).removeprefix("torch.")
        for name in args.workloads.split(","):
            items = workload(name, loaded.tokenizer)
            items_slots = [len(loaded.tokenizer.encode(t, add_special_tokens=False)) + n for t, n in items]
            out = {"default": run_engine(loaded, items, 0, args.max_batch)}
            if args.budget_mb:
                fixed = run_engine(loaded, items, args.budget_mb, args.max_batch)
                fixed["slot_cache_rows_that_fit"] = rows_that_fit(items_slots, fixed["budget_bytes"],
                                                                  fixed["per_token_bytes"])
                out[f"budget_{args.budget_mb}mb"] = fixed
            res[name] = out
            print(name, json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    old.update({k: v for k, v in res.items()})
    args.out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
