#!/usr/bin/env python
"""Regenerate docs/benchmarks.md and its plots (docs/img/bench_*.png) from one run:

    .venv/bin/python scripts/bench_report.py --threads 1            # full: ~10 min on a quiet 2-core box, ~18 loaded
    .venv/bin/python scripts/bench_report.py --threads 1 --quick    # smaller sizes, ~3-7 min (to check the pipeline)

It runs, in this process and on this machine: the standard workload with its four baselines (scripts/bench_engine.py),
the sweeps (throughput against batch size, distinct tasks in flight, virtual-token count), latency percentiles,
classify against separate generate calls, and a torch.profiler breakdown of a decode step at batch 64. Then it writes
the markdown with every figure next to its baselines and PASS/FAIL per target.

The page opens with the decode-speed sweep of `scripts/bench_latency.py`, rendered from its stored runs
(docs/img/raw/latency_sweep*.json, or `--latency-json`; newest first). Text between `<!-- notes:begin -->` and
`<!-- notes:end -->`, and between `<!-- decode-notes:begin -->` and `<!-- decode-notes:end -->`, in the existing
docs/benchmarks.md is kept (analysis written by hand). `--http-json` adds a table written by `scripts/bench_http.py
--json`; `--gpu-log` adds the output of scripts/bench_gpu.sh verbatim. `--save-json` / `--from-json` store or
re-render the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from common import command_line, load_avg  # noqa: E402

NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"
# the analysis of the decode-speed sweep, written by hand
DECODE_NOTES_BEGIN, DECODE_NOTES_END = "<!-- decode-notes:begin -->", "<!-- decode-notes:end -->"
LATENCY_RUNS = "docs/img/raw/latency_sweep*.json"  # where scripts/bench_latency.py --json keeps its runs


# ------------------------------------------------------------------------------------------------------- measuring

def measure(args) -> dict:
    import bench_engine as B
    import torch

    from prompt_core.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    eargs = argparse.Namespace(
        quick=args.quick, model="default", device=args.device, dtype=args.dtype, requests=64, tasks=32,
        new_tokens=32, virtual_tokens=16, batch=64, peft_requests=16, peft_recompute=False, keep_eos=False,
        mm_size=2048, repeats=args.repeats, threads=args.threads, tasks_requests=None, tasks_new_tokens=8)
    if args.quick:
        eargs.requests, eargs.tasks, eargs.new_tokens, eargs.peft_requests, eargs.batch = 16, 8, 16, 4, 16
    t_start = time.time()
    with B.warnings_off():
        loaded = load_model(None, args.device, args.dtype)
    res = B.standard(loaded, eargs)
    res["command"] = command_line()

    # throughput against batch size: B requests, mixed tasks, engine and hf generate at the same batch
    print("\nsweep: batch size")
    batches = [1, 4, 8, 16] if args.quick else [1, 8, 16, 32, 64]
    tasks = B.make_tasks(loaded, eargs.tasks, eargs.virtual_tokens, seed=1)
    sweep_b = []
    for b in batches:
        reqs = B.make_requests(tasks, b, eargs.new_tokens, prefix=f"b{b}_")
        e = B.run_engine(loaded, reqs, f"engine_b{b}", max_batch=b)
        h = B.run_hf_generate(loaded, [r.text for r in reqs], eargs.new_tokens, b)
        sweep_b.append({"batch": b, "engine": e.summary(), "hf": h.summary()})
        print(f"  batch {b:>3}: engine {e.tps:6.1f} tok/s (decode {e.extra['decode_tok_per_s']:.0f}), "
              f"hf generate {h.tps:6.1f} tok/s -> {e.tps / h.tps:.2f}x  load {e.load}")
    res["sweep_batch"] = sweep_b

    sweep_tasks(B, loaded, eargs, res, args.quick)

    # throughput against virtual-token count (soft kinds only; T = 0 is hard prompts)
    print("\nsweep: virtual tokens")
    sweep_v = []
    for T in ([0, 8, 32] if args.quick else [0, 8, 32, 128]):
        ts = B.make_tasks(loaded, eargs.tasks, T, kinds=B.KINDS[1:], seed=200 + T, tag=f"v{T}_")
        reqs = B.make_requests(ts, eargs.requests, eargs.new_tokens, prefix=f"v{T}_")
        r = B.run_engine(loaded, reqs, f"virtual_{T}", max_batch=eargs.batch)
        sweep_v.append({"virtual_tokens": T, "engine": r.summary()})
        print(f"  T={T:>3}: {r.tps:6.1f} tok/s, TTFT p50 {1000 * r.summary()['ttft_p50']:.0f} ms  load {r.load}")
    res["sweep_virtual"] = sweep_v

    print("\nclassify")
    c = B.classify_vs_generate(loaded, eargs)
    res["classify"] = {"classify": c["classify"].summary(), "generate": c["generate"].summary(),
                       "longest_verbalizer_tokens": c["longest_verbalizer_tokens"]}
    cc, cg = c["classify"], c["generate"]
    res["verdicts"].append(B.verdict("classify / separate generate calls (req/s)", cc.rps / cg.rps, 1.0,
                                     f"({cc.rps:.1f} vs {cg.rps:.1f} req/s; per CPU-second "
                                     f"{(cc.requests / cc.cpu_s) / (cg.requests / cg.cpu_s):.2f})"))
    pargs = argparse.Namespace(**{**vars(eargs), "batch": 16 if args.quick else 64})
    res["profile"] = B.profile_decode(loaded, pargs)
    res["total_s"] = time.time() - t_start
    res["load_end"] = load_avg()
    return res


def sweep_tasks(B, loaded, eargs, res: dict, quick: bool) -> None:
    """Throughput against distinct tasks: the same requests (short inputs, 8 new tokens) over n prompt-tuning tasks
    (one kind, same T, so that only the number of distinct prompts changes; kind mixing is the standard workload's
    mixed-vs-single comparison)."""
    from prompt_core.spec import PromptKind
    print("\nsweep: distinct tasks (prompt tuning, T = %d)" % eargs.virtual_tokens)
    counts = [1, 8, 64] if quick else [1, 8, 64, 512]
    n_req = 64 if quick else 512
    new_tok = 8
    sweep_t = []
    for n in counts:
        ts = B.make_tasks(loaded, n, eargs.virtual_tokens, kinds=(PromptKind.PROMPT_TUNING,), seed=100 + n,
                          tag=f"n{n}_")
        reqs = B.make_requests(ts, n_req, new_tok, prefix=f"n{n}_", texts=B.CLASSIFY_TEXTS)
        r = B.run_engine(loaded, reqs, f"tasks_{n}", max_batch=eargs.batch)
        sweep_t.append({"tasks": n, "requests": n_req, "new_tokens": new_tok, "kind": "prompt_tuning",
                        "engine": r.summary()})
        print(f"  {n:>4} tasks: {r.tps:6.1f} tok/s, {r.rps:5.2f} req/s, {r.tokens / r.cpu_s:.1f} tok/cpu-s  "
              f"load {r.load}")
    res["sweep_tasks"] = sweep_t
    base, last = sweep_t[0]["engine"], sweep_t[-1]["engine"]
    res["verdicts"] = [v for v in res["verdicts"] if "tasks / 1 task" not in v["target"]]
    res["verdicts"].append(B.verdict(
        f"{counts[-1]} tasks / 1 task", last["tok_per_s"] / base["tok_per_s"], 0.9,
        f"({last['tok_per_s']:.1f} vs {base['tok_per_s']:.1f} tok/s; per CPU-second "
        f"{last['tok_per_cpu_s'] / base['tok_per_cpu_s']:.2f})"))


def rerun(args, res: dict) -> dict:
    """Measure one part again (same settings) and merge it into saved results."""
    import bench_engine as B
    import torch

    from prompt_core.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = res["config"]
    eargs = argparse.Namespace(**cfg)
    with B.warnings_off():
        loaded = load_model(None, args.device, args.dtype)
    if args.rerun == "tasks":
        sweep_tasks(B, loaded, eargs, res, bool(cfg.get("quick")))
    elif args.rerun == "profile":
        res["profile"] = B.profile_decode(loaded, eargs)
    res.setdefault("reruns", []).append({"part": args.rerun, "date_utc": B.env_info()["date_utc"],
                                         "command": command_line(), "load_end": load_avg()})
    return res


# ------------------------------------------------------------------------------------------------------- plotting

def plots(res: dict, img: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    out = {}
    bound = res["bound"]["tok_per_s"]

    def save(fig, name):
        path = img / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[name] = f"img/{name}"

    sb = res["sweep_batch"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [d["batch"] for d in sb]
    ax.plot(xs, [d["engine"]["tok_per_s"] for d in sb], "o-", label="engine (mixed tasks), end to end")
    ax.plot(xs, [d["engine"]["decode_tok_per_s"] for d in sb], "o--", label="engine, decode steps only")
    ax.plot(xs, [d["hf"]["tok_per_s"] for d in sb], "s-", label="HF generate, no prompts")
    ax.axhline(bound, color="gray", ls=":", label=f"compute bound {bound:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (requests)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs batch size")
    ax.legend(fontsize=8)
    save(fig, "bench_batch.png")

    st = res["sweep_tasks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([d["tasks"] for d in st], [d["engine"]["tok_per_s"] for d in st], "o-")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("distinct tasks over the requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput vs distinct tasks ({st[0]['requests']} requests)")
    save(fig, "bench_tasks.png")

    sv = res["sweep_virtual"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([d["virtual_tokens"] for d in sv], [d["engine"]["tok_per_s"] for d in sv], "o-", label="tokens/s")
    ax.set_xlabel("virtual tokens per prompt (0 = hard prompts)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot([d["virtual_tokens"] for d in sv], [1000 * d["engine"]["ttft_p50"] for d in sv], "s--", color="C1",
             label="TTFT p50 (ms)")
    ax2.set_ylabel("TTFT p50 (ms)")
    ax.set_title("Throughput vs virtual-token count")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    save(fig, "bench_virtual.png")

    r = res["results"]
    names = list(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.2
    for i, (key, label) in enumerate([("ttft_p50", "TTFT p50"), ("lat_p50", "latency p50"),
                                      ("lat_p95", "latency p95"), ("lat_p99", "latency p99")]):
        ax.bar([j + (i - 1.5) * w for j in range(len(names))], [r[n][key] for n in names], w, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("Latency (all requests arrive at once; PEFT: service time per request)")
    ax.legend(fontsize=8)
    save(fig, "bench_latency.png")
    return out


# ------------------------------------------------------------------------------------------------------- markdown

def f1(x) -> str:
    return "-" if x is None or x != x else f"{x:.1f}"


def ms(x) -> str:
    return "-" if x is None or x != x else f"{1000 * x:.0f}"


def standard_table(add, r: dict, b: dict) -> None:
    add("| system | requests | tokens | wall s | req/s | tok/s | tok/cpu-s | TTFT p50 ms | TPOT p50 ms | "
        "latency p50 / p95 / p99 ms | peak RSS MiB | vs single | vs HF | vs PEFT | vs bound |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in r.items():
        rat = lambda k: f"{s['tok_per_s'] / r[k]['tok_per_s']:.2f}x"  # noqa: E731
        add(f"| {name} | {s['requests']} | {s['tokens']} | {s['wall_s']:.1f} | {s['req_per_s']:.2f} | "
            f"{s['tok_per_s']:.1f} | {f1(s.get('tok_per_cpu_s'))} | {ms(s['ttft_p50'])} | {ms(s['tpot_p50'])} | "
            f"{ms(s['lat_p50'])} / {ms(s['lat_p95'])} / {ms(s['lat_p99'])} | {s['peak_rss_mb']:.0f} | "
            f"{rat('engine_single_task')} | {rat('hf_generate')} | {rat('peft_sequential')} | "
            f"{s['tok_per_s'] / b['tok_per_s']:.2f} |")


def render(res: dict, imgs: dict[str, str], notes: str, http: dict | None, gpu_log: str | None,
           others: list[dict] = (), latency: list[dict] = (), decode_notes: str = "") -> str:
    """The whole page: the decode-speed sweep (newest run first) when there is one, then this run's sections."""
    sections = [["# Benchmarks\n"]]
    if latency:
        sections += [decode_sweep(latency, imgs, decode_notes), ["## Standard workload\n"]]
    sections += [about(res), targets(res, others), standard_workload(res, imgs), other_runs(others),
                 batch_sweep(res, imgs), tasks_sweep(res, imgs), virtual_sweep(res, imgs), classify(res),
                 profile(res), http_section(http), gpu_section(gpu_log), notes_section(notes)]
    return "\n".join(line for section in sections for line in section)


def about(res: dict) -> list[str]:
    env, r = res["env"], res["results"]
    L = ["Generated by `scripts/bench_report.py`; do not edit outside the notes blocks. Regenerate with:\n",
         "```\n.venv/bin/python scripts/bench_report.py --threads 1\n```\n"]
    g = env.get("git")
    if g:
        L.append(f"Measured at commit `{g['head']}`; engine last changed in `{g['engine_commit']}`"
                 f"{' (with uncommitted engine changes)' if g['engine_dirty'] else ''}.\n")
    L.append(f"This file: **{env['date_utc']}**, command `{res.get('command', '')}`, "
             f"{env['cpus']} CPUs ({env['processor']}), torch {env['torch']}, **{env['threads']} torch thread(s)**, "
             f"{res['device']} {res['dtype']}, whole run {res.get('total_s', 0) / 60:.1f} min. Load average at the "
             f"start {r['engine_mixed']['load']}, at the end {res.get('load_end')}: the machine is shared by other "
             "engineers, so wall-clock numbers are noisy; `tok/cpu-s` (tokens per second of this process's CPU time) "
             "is steadier.\n")
    for rr in res.get("reruns", []):
        L.append(f"Part `{rr['part']}` measured again at {rr['date_utc']} with `{rr['command']}` (load at its end "
                 f"{rr['load_end']}).\n")
    if res.get("render_command"):
        L.append(f"Rendered (with the extra runs below) by `{res['render_command']}`.\n")
    L.append("Scripts: `scripts/bench_engine.py` (in-process engine + baselines, `--quick`, `--profile`), "
             "`scripts/bench_http.py` (HTTP load generator against `python -m server`), `scripts/bench_gpu.sh` (GPU "
             "host), this report. None of it runs in CI, and nothing asserts on time.\n")
    return L


def passed(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def targets(res: dict, others: list[dict]) -> list[str]:
    heads = "".join(f" {o['env']['date_utc'][11:]} {o['dtype'].replace('torch.', '')} (load "
                    f"{o['results']['engine_mixed']['load'][0]}) |" for o in others)
    L = ["## Targets\n",
         f"| target | measured (this run, {res['dtype'].replace('torch.', '')}) | threshold | result |{heads}",
         "|---|---|---|---|" + "---|" * len(others)]
    for v in res["verdicts"]:
        cells = ""
        for o in others:
            ov = next((x for x in o["verdicts"] if x["target"] == v["target"]), None)
            cells += f" {ov['value']:.2f} {passed(ov['pass'])} |" if ov else " - |"
        L.append(f"| {v['target']} {v['detail']} | {v['value']:.2f} | >= {v['threshold']} | {passed(v['pass'])} |"
                 f"{cells}")
    if others:
        L.append("\nThe extra columns are other runs, shown in their own sections below the standard workload "
                 "(their sweeps, if any, stay in their raw JSON).")
    L.append("")
    return L


def standard_workload(res: dict, imgs: dict[str, str]) -> list[str]:
    env, b, r, cfg = res["env"], res["bound"], res["results"], res["config"]
    L = ["## Standard workload\n",
         f"{cfg['requests']} requests over {cfg['tasks']} tasks mixing hard, prompt tuning, P-tuning and prefix "
         f"tuning (T = {cfg['virtual_tokens']} virtual tokens, random tensors on the model's scale), "
         f"{cfg['new_tokens']} new tokens each, greedy, engine max batch {cfg['batch']}, all requests submitted at "
         "t0. EOS is disabled on the engine instance and `min_new_tokens` is set for HF, so every system generates "
         "the same number of tokens; tokens/s counts generated tokens only.\n"]
    standard_table(L.append, r, b)
    e, p, h = r["engine_mixed"], r["peft_sequential"], r["hf_generate"]
    L += [
        "",
        f"- Baseline *single*: the same engine and requests, all on one prompt-tuning task with T = "
        f"{cfg['virtual_tokens']}.",
        "- Baseline *HF*: `model.generate` on the same input texts without any prompt, left padded, batch "
        f"{cfg['batch']}, greedy, `min_new_tokens = max_new_tokens`. Its TTFT is `generate(max_new_tokens=1)` on "
        "the same batch; all rows of a batch finish together.",
        f"- Baseline *PEFT*: {p['requests']} of the {cfg['requests']} requests (the first ones, which cycle through "
        f"every kind), one at a time, switching adapters (`set_adapter` on one `PeftModel` per PEFT type; hard "
        f"prompts on the base model). Decoding: {p.get('decoding')} (prefill with `peft_model(input_ids=...)`, "
        "which injects the prompt; each next token is the base model on the returned cache, as PEFT's generate "
        "does). A sequential server's rate does not depend on how many requests it gets, so this subset's tokens/s "
        f"is the estimate for all {cfg['requests']} (an extrapolation). {p.get('token_agreement')}. Adapter loading "
        f"({p.get('adapter_load_s', 0):.1f} s) is not counted. Its latency is service time (no queueing).",
        f"- Compute bound: best fp32 `torch.mm` {cfg['mm_size']}^2 = **{b['matmul_flops'] / 1e9:.1f} GFLOP/s** with "
        f"{env['threads']} thread(s), divided by **{b['flops_per_token'] / 1e9:.3f} GFLOP/token** (2 x "
        f"{b['non_embedding_params'] / 1e6:.1f}M non-embedding params + 2 x {b['vocab']} x {b['hidden']} LM head; "
        f"attention over the context not counted) = **{b['tok_per_s']:.0f} tokens/s**. Memory: copy "
        f"{b['copy_bytes_per_s'] / 1e9:.1f} GB/s, {b['weight_bytes'] / 2**20:.0f} MiB of weights per decode step "
        f"-> at most {b['bandwidth_tok_per_s_at_batch']:.0f} tokens/s at batch {cfg['batch']}.",
        f"- Engine, mixed: {e['steps']} steps; prefill {e['prefill_s']:.1f} s, decode {e['decode_s']:.1f} s, other "
        f"(scheduling, detokenization, Python) {e['other_s']:.1f} s. Decode-only steps at batch {cfg['batch']}: "
        f"{e['decode_full_batch_step_ms']:.0f} ms/step = **{e['decode_full_batch_tok_per_s']:.0f} tokens/s = "
        f"{e['decode_full_batch_tok_per_s'] / b['tok_per_s']:.0%} of the compute bound**.",
        f"- Where the engine and HF differ: engine prefill {e['prefill_s']:.1f} s (every prompt carries its template "
        f"and T virtual tokens, and rows are padded to the longest) against HF's TTFT {h['ttft_p50']:.1f} s (raw "
        f"texts only); decode {1000 * e['decode_s'] / max(1, e['steps']):.0f} ms per step (engine, prefill step "
        f"included in the count) against HF's TPOT {1000 * h['tpot_p50']:.0f} ms.",
        "",
        f"![latency]({imgs['bench_latency.png']})\n",
    ]
    return L


def other_runs(others: list[dict]) -> list[str]:
    L = []
    for o in others:
        oe, ob = o["env"], o["bound"]
        g = oe.get("git", {})
        L.append(f"### Another run of the standard workload: {oe['date_utc']}, {o['dtype'].replace('torch.', '')}, "
                 f"load {o['results']['engine_mixed']['load']}\n")
        L.append(f"`{oe['argv'] and 'python ' + oe['argv']}` at commit `{g.get('head')}` "
                 f"(engine `{g.get('engine_commit')}`), "
                 f"{oe['threads']} thread(s), {o['device']} {o['dtype']}; compute bound ({o['dtype']} `torch.mm`) "
                 f"{ob['tok_per_s']:.0f} tokens/s. PEFT served "
                 f"{o['results']['peft_sequential']['requests']} requests.\n")
        standard_table(L.append, o["results"], ob)
        L.append("")
        for v in o["verdicts"]:
            L.append(f"- {passed(v['pass'])} {v['target']}: {v['value']:.2f} (>= {v['threshold']}) {v['detail']}")
        m2 = o["results"]["engine_mixed"]
        L.append(f"- Engine, mixed: prefill {m2['prefill_s']:.1f} s, decode {m2['decode_s']:.1f} s; decode-only steps "
                 f"at batch {o['config']['batch']}: {m2['decode_full_batch_step_ms']:.0f} ms/step = "
                 f"{m2['decode_full_batch_tok_per_s']:.0f} tokens/s.\n")
    return L


def batch_sweep(res: dict, imgs: dict[str, str]) -> list[str]:
    b, cfg = res["bound"], res["config"]
    L = ["## Throughput against batch size\n",
         f"B requests from the mixed workload, engine max batch B, against HF generate at batch B "
         f"({cfg['new_tokens']} new tokens).\n",
         "| batch | engine tok/s | engine decode-only tok/s | HF generate tok/s | engine / HF | engine / bound | "
         "load |",
         "|---|---|---|---|---|---|---|"]
    for d in res["sweep_batch"]:
        L.append(f"| {d['batch']} | {d['engine']['tok_per_s']:.1f} | {d['engine']['decode_tok_per_s']:.0f} | "
                 f"{d['hf']['tok_per_s']:.1f} | {d['engine']['tok_per_s'] / d['hf']['tok_per_s']:.2f}x | "
                 f"{d['engine']['tok_per_s'] / b['tok_per_s']:.2f} | {d['engine']['load'][0]} |")
    L.append(f"\n![batch]({imgs['bench_batch.png']})\n")
    return L


def tasks_sweep(res: dict, imgs: dict[str, str]) -> list[str]:
    st, cfg = res["sweep_tasks"], res["config"]
    L = ["## Throughput against distinct tasks\n",
         f"The same {st[0]['requests']} requests (short inputs, {st[0]['new_tokens']} new tokens, "
         f"{st[0].get('kind', 'kinds mixed')} tasks with T = {cfg['virtual_tokens']}, engine "
         f"max batch {cfg['batch']}) spread over N distinct tasks. At most {cfg['batch']} are in a batch at once; "
         f"with N >= {cfg['batch']} every batch holds {cfg['batch']} different prompts.\n",
         "| tasks | tok/s | req/s | tok/cpu-s | TTFT p50 ms | latency p99 ms | vs 1 task | vs 1 task per CPU-s | "
         "load |",
         "|---|---|---|---|---|---|---|---|---|"]
    for d in st:
        s = d["engine"]
        L.append(f"| {d['tasks']} | {s['tok_per_s']:.1f} | {s['req_per_s']:.2f} | {f1(s.get('tok_per_cpu_s'))} | "
                 f"{ms(s['ttft_p50'])} | {ms(s['lat_p99'])} | {s['tok_per_s'] / st[0]['engine']['tok_per_s']:.2f}x | "
                 f"{s['tok_per_cpu_s'] / st[0]['engine']['tok_per_cpu_s']:.2f}x | {s['load'][0]} |")
    L.append(f"\n![tasks]({imgs['bench_tasks.png']})\n")
    return L


def virtual_sweep(res: dict, imgs: dict[str, str]) -> list[str]:
    cfg = res["config"]
    L = ["## Throughput against virtual-token count\n",
         f"{cfg['requests']} requests over {cfg['tasks']} soft-prompt tasks (prompt tuning, P-tuning, prefix tuning; "
         "T = 0 means hard prompts), same inputs.\n",
         "| virtual tokens | tok/s | TTFT p50 ms | TPOT p50 ms | latency p99 ms | load |\n|---|---|---|---|---|---|"]
    for d in res["sweep_virtual"]:
        s = d["engine"]
        L.append(f"| {d['virtual_tokens']} | {s['tok_per_s']:.1f} | {ms(s['ttft_p50'])} | {ms(s['tpot_p50'])} | "
                 f"{ms(s['lat_p99'])} | {s['load'][0]} |")
    L.append(f"\n![virtual]({imgs['bench_virtual.png']})\n")
    return L


def classify(res: dict) -> list[str]:
    c = res["classify"]
    L = ["## Classify\n",
         f"{c['classify']['requests']} short inputs, 4 labels (one verbalizer of "
         f"{c['longest_verbalizer_tokens']} tokens), classify mode (every label scored in one prefill) against the "
         f"same number of separate generate calls with `max_new_tokens` = {c['longest_verbalizer_tokens']} (the "
         "longest verbalizer), both through the engine, batched.\n",
         "| mode | req/s | CPU s | requests per CPU-second | latency p50 ms | p99 ms | load |",
         "|---|---|---|---|---|---|---|"]
    for k in ("classify", "generate"):
        s = c[k]
        L.append(f"| {s['name']} | {s['req_per_s']:.2f} | {s['cpu_s']:.2f} | {s['requests'] / s['cpu_s']:.2f} | "
                 f"{ms(s['lat_p50'])} | {ms(s['lat_p99'])} | {s['load'][0]} |")
    cc, cg = c["classify"], c["generate"]
    ratio = (cc['requests'] / cc['cpu_s']) / (cg['requests'] / cg['cpu_s'])
    L += [f"\nPer CPU-second, classify / generate = {ratio:.2f}.", ""]
    return L


def profile(res: dict) -> list[str]:
    pr, cfg = res["profile"], res["config"]
    L = ["## Where a decode step spends its time\n",
         f"torch.profiler over {pr['steps']} decode-only engine steps at batch {pr['batch']} (the mixed workload, "
         f"~{cfg['virtual_tokens']}+ prompt tokens in the cache): **{pr['step_ms']:.0f} ms/step** wall (load "
         f"{pr['load']}). Stages are marked by wrapping engine functions from the benchmark (inclusive time); "
         "percentages are of the step's wall time.\n",
         "| stage | ms/step | % |\n|---|---|---|"]
    L += [f"| {d['name'][3:]} | {d['cpu_total_ms']:.1f} | {d['pct']:.1f} |" for d in pr["stages"]]
    L.append("\n| aten op (self time) | ms/step | % | calls/step |\n|---|---|---|---|")
    L += [f"| {d['name']} | {d['self_ms']:.2f} | {d['pct']:.1f} | {d['calls']} |" for d in pr["ops"][:15]]
    L.append("\n| op, input shapes | ms/step | % |\n|---|---|---|")
    L += [f"| {d['name']} `{d['shapes']}` | {d['self_ms']:.2f} | {d['pct']:.1f} |" for d in pr["op_shapes"][:10]]
    if "ops_self_ms" in pr:
        L.append(f"\naten ops' self time: {pr['ops_self_ms']:.0f} ms of the {pr['step_ms']:.0f} ms step; the rest is "
                 "Python, dispatch, and time other processes held the CPU.")
    pf = pr.get("prefill")
    if pf:
        L.append(f"\n**Prefill step** ({pf['rows']} requests at once, Q = {pf['Q']} queries per row, "
                 f"{pf['real_queries']} real of {pf['computed_queries']} computed = "
                 f"{pf['real_queries'] / pf['computed_queries']:.0%}; followed by the first decode in the same engine "
                 f"step): {pf['wall_ms']:.0f} ms.\n")
        L.append("| stage / op | ms | % |\n|---|---|---|")
        L += [f"| {d['name'][3:]} | {d['ms']:.1f} | {d['pct']:.1f} |" for d in pf["stages"]]
        L += [f"| {d['name']} | {d['ms']:.1f} | {d['pct']:.1f} |" for d in pf["ops"][:8]]
    L.append("")
    return L


def http_section(http: dict | None) -> list[str]:
    if not http:
        return ["## HTTP\n", "Not part of this run: `scripts/bench_http.py --help` (start `python -m server`, then run "
                "it; pass its `--json` to `bench_report.py --http-json`).\n"]
    L = ["## HTTP\n",
         f"`{http.get('command', 'scripts/bench_http.py')}` against `python -m server` on the same machine, "
         f"{http.get('date_utc', '')}, load {http.get('load')}.\n",
         "| mode | requests | ok | errors | req/s | tok/s | server CPU s | tok per server CPU-s | TTFT p50 / p95 ms | "
         "TPOT p50 ms | latency p50 / p95 / p99 ms | load |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in http["runs"]:
        L.append(f"| {s['mode']} | {s['requests']} | {s['ok']} | {s['errors']} | {s['req_per_s']:.2f} | "
                 f"{s['tok_per_s']:.1f} | {f1(s.get('server_cpu_s'))} | {f1(s.get('tok_per_server_cpu_s'))} | "
                 f"{ms(s.get('ttft_p50'))} / {ms(s.get('ttft_p95'))} | {ms(s.get('tpot_p50'))} | {ms(s['lat_p50'])} / "
                 f"{ms(s['lat_p95'])} / {ms(s['lat_p99'])} | {s.get('load', ['-'])[0]} |")
    if http.get("server_peak_rss_mb"):
        L.append(f"\nServer peak RSS during the load: {http['server_peak_rss_mb']:.0f} MiB.")
    L.append("")
    return L


def gpu_section(gpu_log: str | None) -> list[str]:
    if gpu_log:
        return ["## GPU\n", "Output of `scripts/bench_gpu.sh`:\n\n```\n" + gpu_log.strip() + "\n```\n"]
    return ["## GPU\n", "Not run yet: no GPU host was available. `bash scripts/bench_gpu.sh` runs the engine benchmark "
            "in bf16 in a few minutes and prints everything; pass its saved output to `bench_report.py --gpu-log`.\n"]


def notes_section(notes: str) -> list[str]:
    return ["## Notes\n", NOTES_BEGIN,
            notes.strip() if notes.strip() else "(analysis written by hand goes here; it survives regeneration)",
            NOTES_END, ""]


# ------------------------------------------------------------------------------------- the decode-speed sweep

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


def kept(page: str, begin: str, end: str) -> str:
    """The text written by hand between two markers of the existing page ("" when it has none)."""
    return page.split(begin, 1)[1].split(end, 1)[0] if begin in page and end in page else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, to check the pipeline")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default; 1 on a shared box)")
    p.add_argument("--repeats", type=int, default=2, help="standard workload: interleaved runs, best kept")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--http-json", type=Path, help="results of scripts/bench_http.py --json to include")
    p.add_argument("--engine-json", type=Path, action="append", default=[],
                   help="another `bench_engine.py --json` run of the standard workload to show as well (repeatable)")
    p.add_argument("--gpu-log", type=Path, help="saved output of scripts/bench_gpu.sh to include")
    p.add_argument("--latency-json", type=Path, action="append", default=None,
                   help=f"a `bench_latency.py --json` run for the decode-speed section, which opens the page "
                        f"(repeatable; default: every {LATENCY_RUNS}; newest first)")
    p.add_argument("--save-json", type=Path, help="also write the raw numbers here")
    p.add_argument("--from-json", type=Path, help="render from saved raw numbers instead of measuring")
    p.add_argument("--rerun", choices=["tasks", "profile"],
                   help="with --from-json: measure this part again, merge it, and render")
    args = p.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        if args.rerun:
            res = rerun(args, res)
        res["render_command"] = command_line()
    else:
        res = measure(args)
    if args.save_json:
        args.save_json.write_text(json.dumps(res, indent=1, default=str))
    old = args.out.read_text() if args.out.exists() else ""
    imgs = plots(res, args.out.parent / "img")
    written = len(imgs)
    http = json.loads(args.http_json.read_text()) if args.http_json else None
    gpu = args.gpu_log.read_text() if args.gpu_log else None
    others = [json.loads(pth.read_text()) for pth in args.engine_json]
    latency = latency_runs(sorted(ROOT.glob(LATENCY_RUNS)) if args.latency_json is None else args.latency_json)
    plot = latency and latency[0]["args"].get("plot")
    if plot and (ROOT / plot).exists():  # the newest run's plot (each run writes the same file)
        imgs["latency_plot"] = os.path.relpath(ROOT / plot, args.out.parent)
    args.out.write_text(render(res, imgs, kept(old, NOTES_BEGIN, NOTES_END), http, gpu, others, latency,
                               kept(old, DECODE_NOTES_BEGIN, DECODE_NOTES_END)))
    print(f"\nwrote {args.out} and {written} plots in {args.out.parent / 'img'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
