"""The decode-speed sweep's part of docs/benchmarks.md, from the stored `bench_latency --json` runs: the newest
run in full with its plot and the notes written by hand, then each earlier run's tables, and the goals of the
decode-speed issue as ratios."""

from __future__ import annotations

import json
import re
from pathlib import Path

# the analysis of the decode-speed sweep, written by hand
DECODE_NOTES_BEGIN, DECODE_NOTES_END = "<!-- decode-notes:begin -->", "<!-- decode-notes:end -->"

# the systems of scripts/bench_latency.py, in the table's order, as the page names them
DECODE_SYSTEMS = {"engine": "engine (in-process, hard prompt)",
                  "engine bfloat16": "engine, `--dtype bfloat16` (what `auto` serves on a CPU with native bf16)",
                  "engine int8": "engine, `--quantize int8`",
                  "engine int4": "engine, `--quantize int4`",
                  "engine compiled": "engine, `--compile` (float32)",
                  "engine bfloat16-compiled": "engine, `--compile --dtype bfloat16`",
                  "http": "HTTP server (`python -m server`, streaming `/generate`)",
                  "http bfloat16": "HTTP server, `--dtype bfloat16`",
                  "http int8": "HTTP server, `--quantize int8`",
                  "http int4": "HTTP server, `--quantize int4`",
                  "http compiled": "HTTP server, `--compile` (float32)",
                  "http bfloat16-compiled": "HTTP server, `--compile --dtype bfloat16`",
                  "hf": "transformers `generate`, no prompt",
                  "llama.cpp F32": "llama.cpp F32",
                  "llama.cpp Q4_1": "llama.cpp Q4_1 (the file the default model ships in)"}


def latency_runs(paths: list[Path]) -> list[dict]:
    """The stored `bench_latency.py --json` runs, newest first."""
    return sorted((json.loads(p.read_text()) for p in paths), key=lambda run: run["when"], reverse=True)


def decode_sweep(runs: list[dict], imgs: dict[str, str], notes: str) -> list[str]:
    """The newest run in full (with its plot and the notes written by hand), then each earlier run's tables."""
    newest = runs[0]
    batches = newest["args"]["batches"]
    L = [f"## Decode speed at batch {', '.join(map(str, batches[:-1]))} and {batches[-1]} (newest run: "
         f"{newest['when'][:10]})\n"]
    L += decode_run(newest, imgs.get("latency_plot"))
    L += [DECODE_NOTES_BEGIN, notes.strip() or "(analysis written by hand goes here; it survives regeneration)",
          DECODE_NOTES_END, ""]
    for run in runs[1:]:
        L.append(f"### An earlier run: {run['env']['date_utc']}\n")
        L += decode_run(run, None)
    return L


def short_argv(argv: str) -> str:
    """The command line with paths outside the repository (a llama.cpp build, a model file) cut to their name."""
    return " ".join(f".../{Path(a).name}" if a.startswith("/") or a.startswith(".venv/") else a
                    for a in argv.split())


def decode_run(run: dict, plot: str | None) -> list[str]:
    a, env = run["args"], run["env"]
    git = run.get("git") or env.get("git") or {}
    engine = (git.get("engine_commit") or "?").split()[0]
    load = run["load"]
    L = [f"`python {short_argv(env['argv'])}` at commit `{git.get('head')}` (engine last changed in `{engine}`"
         f"{', with uncommitted engine changes' if git.get('engine_dirty') else ''}), load average {load[0][0]} -> "
         f"{load[1][0]}, {a['threads']} torch thread(s) (llama.cpp: as many), {a['dtype']}, {a['prompt_tokens']}-token "
         f"prompts, {a['new_tokens']} new tokens, EOS off (`ignore_eos` over HTTP). Decode tokens/s excludes the "
         "prefill everywhere (llama.cpp's S_TG column).\n",
         "| decode tokens/s | " + " | ".join(f"batch {b}" for b in a["batches"]) + " |",
         "| --- | " + " | ".join("---" for _ in a["batches"]) + " |"]
    speeds = run["decode_tokens_per_s"]
    for system in [s for s in DECODE_SYSTEMS if s in speeds] + [s for s in speeds if s not in DECODE_SYSTEMS]:
        row = speeds[system]
        L.append(f"| {DECODE_SYSTEMS.get(system, system)} | "
                 + " | ".join(f"{row[str(b)]:.1f}" if str(b) in row else "" for b in a["batches"]) + " |")
    L.append("")
    if plot:
        L.append(f"![decode sweep]({plot})\n")
    L += ["Goals of the decode-speed issue, as ratios in this run:\n", "| goal | ratio | |", "| --- | --- | --- |"]
    L += [f"| {name} (>= {target}) | {ratio} | {verdict} |" for name, target, ratio, verdict in decode_goals(run)]
    L.append("")
    return L


def decode_goals(run: dict) -> list[tuple[str, float, str, str]]:
    """(goal, target, ratio, verdict) per goal bench_latency.py measured; the per-batch goals of one kind (HTTP vs
    in-process) share a row."""
    rows: list[tuple[str, float, list[float]]] = []
    for g in run["goals"]:
        head, sep, batch = g["name"].rpartition(", batch ")
        if sep and rows and rows[-1][0].startswith(head + ", batch ") and rows[-1][1] == g["target"]:
            rows[-1] = (f"{rows[-1][0]} / {batch}", g["target"], [*rows[-1][2], g["ratio"]])
        else:
            rows.append((g["name"], g["target"], [g["ratio"]]))
    out = []
    for name, target, ratios in rows:
        verdict = "met" if all(r >= target for r in ratios) else "not met"
        bound = bandwidth_bound(run, name)
        if bound is not None:
            wbytes, label, tokens = bound
            verdict += (f": read bandwidth {run['read_bytes_per_s'] / 1e9:.1f} GB/s (one pass over 512 MiB) / "
                        f"{wbytes / 1e6:.0f} MB of {label} weights = {tokens:.1f} tokens/s")
        out.append((name, target, " / ".join(f"{r:.2f}" for r in ratios), verdict))
    return out


def bandwidth_bound(run: dict, goal: str) -> tuple[float, str, float] | None:
    """(bytes of weights, their precision, tokens/s) behind a "vs bandwidth bound" goal; runs before the variants
    stored one bound, later ones one per system (the goal names it in parentheses)."""
    m = re.fullmatch(r"batch 1 vs bandwidth bound(?: \((.+)\))?", goal)
    if not m or "read_bytes_per_s" not in run:
        return None
    bounds, system = run["bound_tokens_per_s"], m.group(1) or "engine"
    if not isinstance(bounds, dict):
        return run["weight_bytes"], run["args"]["dtype"], bounds
    label = system.removeprefix("engine").strip().removesuffix("compiled").strip("-") or run["args"]["dtype"]
    return run["read_bytes_per_s"] / bounds[system], label, bounds[system]
