#!/usr/bin/env python
"""In-process engine benchmark for issue 6, with every figure next to baselines measured in the same run.

    python scripts/bench_engine.py --threads 1   # the standard workload (64 requests, 32 tasks, 32 new tokens),
                                                 # ~2-4 min
    python scripts/bench_engine.py --threads 1 --quick    # smaller: ~1 min
    python scripts/bench_engine.py --help

The workload: `--requests` requests spread round-robin over `--tasks` tasks whose kinds cycle through hard, prompt
tuning, P-tuning and prefix tuning (random soft-prompt tensors on the model's own scale, as tests/helpers does), each
generating `--new-tokens` tokens greedily. EOS is disabled on the engine instance (`engine.eos_ids = frozenset()`,
as `min_new_tokens` does for transformers) so every system generates exactly the same number of tokens; pass
`--keep-eos` to keep it. Tokens/s always counts the tokens actually generated.

Baselines, all measured in this process, on this machine, in this run:
  single : the same engine and the same requests, all on ONE prompt-tuning task with the same virtual-token count
  hf     : transformers' batched `model.generate` on the same input texts with no prompt at all (left padding,
           greedy, min_new_tokens = max_new_tokens), batch = the engine's max batch size
  peft   : PEFT one request at a time, switching adapters (one PeftModel per PEFT type sharing the base model,
           `set_adapter` per request; hard prompts go to the base model). Greedy loop with a KV cache: the prefill is
           `peft_model(input_ids=...)` (PEFT injects the virtual tokens / prefix), each next token is the base model
           on the returned cache (what PEFT's own generate does once the prompt is in the cache). Run on a subset
           (`--peft-requests`); the rate of a sequential server does not depend on how many requests it is given, so
           the subset's tokens/s is the estimate for the whole workload (stated in the output).
  bound  : the compute bound, best fp32 torch.mm FLOP/s of `--mm-size`^2 matrices / the model's FLOPs per token
           (2 x non-embedding params + 2 x V x D for the LM head; attention over the context is not counted)

Nothing here asserts on time: targets print PASS/FAIL lines only. `--json PATH` writes every number for
scripts/bench_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_avg, pct  # pct: the one percentile definition of every report

from prompt_core.model import LoadedModel, load_model
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors, make_labels
from server.engine.config import EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.request import EngineRequest, PromptRef, SamplingParams

KINDS = (PromptKind.HARD, PromptKind.PROMPT_TUNING, PromptKind.P_TUNING, PromptKind.PREFIX_TUNING)

TEXTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works.",
    "List three reasons to learn a second language and explain each one in a sentence or two.",
    "What is the capital of France?",
    "Describe your favourite meal.",
    "The film was long but the ending made up for every slow minute of it.",
    "Summarize the plot of a detective novel set in a small mountain village during a snowstorm.",
    "Translate to French: the weather is nice today and we are going to the beach.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "I loved the soundtrack and the actors, but the plot was thin and the pacing dragged through the middle hour.",
    "Tell me about the history of the bicycle.",
    "Hi",
    "Compose a haiku about autumn leaves.",
    "How do vaccines train the immune system to recognise a virus it has never seen before?",
    "Plan a three day trip to Rome.",
]
CLASSIFY_TEXTS = ["Great!", "Terrible.", "It was fine.", "Loved it", "Not for me.", "Meh", "Superb acting", "Boring"]
CLASSIFY_LABELS = {"positive": " positive", "negative": " negative", "neutral": " neutral",
                   "mixed": " mixed feelings"}


# ---------------------------------------------------------------------------------------------------- utilities

def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """Peak resident memory of this process during a block, sampled every 5 ms (psutil)."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(0.005)

    def __enter__(self):
        self.peak = rss_mb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


@dataclass
class Result:
    """One system serving one workload. Times in seconds, memory in MiB."""
    name: str
    requests: int
    tokens: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    load: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    cpu_s: float = 0.0  # process CPU time (user + sys) over the run: less sensitive to other users than wall time

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s

    def summary(self) -> dict:
        return {"name": self.name, "requests": self.requests, "tokens": self.tokens, "wall_s": self.wall_s,
                "req_per_s": self.rps, "tok_per_s": self.tps,
                "ttft_p50": pct(self.ttfts, 50), "ttft_p95": pct(self.ttfts, 95),
                "tpot_p50": pct(self.tpots, 50), "tpot_p95": pct(self.tpots, 95),
                "lat_p50": pct(self.latencies, 50), "lat_p95": pct(self.latencies, 95),
                "lat_p99": pct(self.latencies, 99), "cpu_s": self.cpu_s,
                "tok_per_cpu_s": self.tokens / self.cpu_s if self.cpu_s else float("nan"),
                "peak_rss_mb": self.peak_rss_mb, "load": self.load,
                **self.extra}


# ---------------------------------------------------------------------------------------------------- workload

@dataclass
class Task:
    ref: PromptRef
    tensors: PromptTensors | None


def random_prompts(loaded: LoadedModel, kinds: list[PromptKind], T: int, seed: int) -> list[PromptTensors | None]:
    """Random soft prompts on the scale of the model's embeddings; prefixes are the model's own keys/values for T
    random tokens (computed in batches), as tests/helpers.random_prompt does."""
    cfg = loaded.model.config
    g = torch.Generator().manual_seed(seed)
    scale = loaded.model.get_input_embeddings().weight.float().std().item()
    out: list[PromptTensors | None] = [None] * len(kinds)
    prefix_idx = [i for i, k in enumerate(kinds) if k is PromptKind.PREFIX_TUNING]
    for i, k in enumerate(kinds):
        if k in (PromptKind.PROMPT_TUNING, PromptKind.P_TUNING):
            v = torch.randn(T, cfg.hidden_size, generator=g) * scale
            out[i] = PromptTensors(virtual=v.to(loaded.device, loaded.dtype))
    for c in range(0, len(prefix_idx), 64):
        chunk = prefix_idx[c:c + 64]
        ids = torch.randint(100, cfg.vocab_size, (len(chunk), T), generator=g).to(loaded.device)
        with torch.inference_mode():
            cache = loaded.model(input_ids=ids, use_cache=True).past_key_values
        for j, i in enumerate(chunk):
            kv = torch.stack([torch.stack([layer.keys[j], layer.values[j]]) for layer in cache.layers])
            out[i] = PromptTensors(prefix=kv.clone())
    return out


def make_tasks(loaded: LoadedModel, n_tasks: int, T: int, *, kinds=KINDS, seed: int = 0, labels: bool = False,
               tag: str = "t") -> list[Task]:
    """n_tasks tasks whose kinds cycle through `kinds` (all hard when T == 0)."""
    kinds_list = [PromptKind.HARD if T == 0 else kinds[i % len(kinds)] for i in range(n_tasks)]
    tensors = random_prompts(loaded, kinds_list, T, seed)
    labs = make_labels(CLASSIFY_LABELS) if labels else ()
    tasks = []
    for i, (kind, t) in enumerate(zip(kinds_list, tensors)):
        template = f"Task {i}. Instruction: {{input}}\nResponse:"
        spec = PromptSpec(kind, 0 if kind is PromptKind.HARD else T, template, labs)
        tasks.append(Task(PromptRef(f"{tag}{i}@1", spec, (lambda t=t: t)), t))
    return tasks


def make_requests(tasks: list[Task], n: int, new_tokens: int, *, prefix: str = "r", mode: str = "generate",
                  texts: list[str] = TEXTS) -> list[EngineRequest]:
    return [EngineRequest(f"{prefix}{j}", tasks[j % len(tasks)].ref, texts[j % len(texts)], mode=mode,
                          sampling=SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
            for j in range(n)]


# ---------------------------------------------------------------------------------------------------- systems

PREFIX_CACHING = True  # --no-head-cache turns the prefix cache off


def new_engine(loaded: LoadedModel, max_batch: int) -> LLMEngine:
    return LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=max_batch), max_new_tokens=4096,
                                          prefix_caching=PREFIX_CACHING))


def run_engine(loaded: LoadedModel, requests: list[EngineRequest], name: str, *, max_batch: int = 64,
               keep_eos: bool = False, tokens_out: dict | None = None, engine: LLMEngine | None = None) -> Result:
    """All requests arrive at t0 (offline / saturated). Latency = finish - arrival; TTFT as the engine reports it
    (arrival to first token, queueing included); TPOT = (latency - TTFT) / (tokens - 1).
    `engine`: a running engine to reuse (a server's steady state: its prompt-head cache already holds the tasks);
    None starts a fresh one (cold: every task's head is computed in the timed run)."""
    engine = engine or new_engine(loaded, max_batch)
    if not keep_eos:
        engine.eos_ids = frozenset()
    runner = engine.runner
    steps = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": [], "decode_cpu": [], "prefills": 0}
    real_prefill, real_decode = runner.prefill, runner.decode

    def prefill(seqs, tensors):
        t = time.perf_counter()
        try:
            return real_prefill(seqs, tensors)
        finally:
            steps["prefill_s"] += time.perf_counter() - t
            steps["prefills"] += 1

    def decode(kv_len):
        n, t, c = runner.num_rows, time.perf_counter(), time.process_time()
        try:
            return real_decode(kv_len)
        finally:
            d = time.perf_counter() - t
            steps["decode_s"] += d
            steps["decode_steps"].append((n, d))
            steps["decode_cpu"].append((n, time.process_time() - c))

    runner.prefill, runner.decode = prefill, decode
    gc.collect()
    load = load_avg()
    lat, ttft, tpot, tokens, n_steps = [], [], [], 0, 0
    seqs = {}
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        for r in requests:
            seqs[r.request_id] = engine.add_request(r)
        while engine.has_work():
            outs = engine.step()
            n_steps += 1
            now = time.monotonic()
            for o in outs:
                if not o.finished:
                    continue
                if o.error:
                    raise RuntimeError(f"{o.request_id}: {o.error}")
                s = seqs[o.request_id]
                lat.append(now - s.arrival)
                n_tok = len(s.output_ids) if s.is_classify is False else 0
                tokens += n_tok
                if o.ttft_s is not None:
                    ttft.append(o.ttft_s)
                    if n_tok > 1:
                        tpot.append((now - s.arrival - o.ttft_s) / (n_tok - 1))
                if tokens_out is not None:
                    tokens_out[o.request_id] = list(s.output_ids) if not s.is_classify else o.label_probs
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    runner.prefill, runner.decode = real_prefill, real_decode  # the engine may be reused
    full = [d for n, d in steps["decode_steps"] if n == max_batch]
    full_cpu = [d for n, d in steps["decode_cpu"] if n == max_batch]
    rows_time = sum(n for n, _ in steps["decode_steps"]), sum(d for _, d in steps["decode_steps"])
    extra = {"steps": n_steps, "prefill_s": steps["prefill_s"], "decode_s": steps["decode_s"],
             "other_s": wall - steps["prefill_s"] - steps["decode_s"],
             "decode_tok_per_s": rows_time[0] / rows_time[1] if rows_time[1] else float("nan"),
             "decode_full_batch_steps": len(full),
             "decode_full_batch_tok_per_s": max_batch * len(full) / sum(full) if full else float("nan"),
             "decode_full_batch_step_ms": 1000 * statistics.median(full) if full else float("nan"),
             "decode_full_batch_tok_per_cpu_s": max_batch * len(full_cpu) / sum(full_cpu) if full_cpu and sum(full_cpu)
             else float("nan")}
    return Result(name, len(requests), tokens, wall, lat, ttft, tpot, mem.peak, load, extra, cpu)


def run_hf_generate(loaded: LoadedModel, texts: list[str], new_tokens: int, batch: int, *,
                    keep_eos: bool = False) -> Result:
    """transformers' batched generate with no prompts: the raw input texts, left padded, greedy. TTFT is the time of
    the same batch's generate with max_new_tokens=1 (generate does not stream); all rows of a batch finish together."""
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    encs = [tok(c, return_tensors="pt", padding=True, padding_side="left").to(loaded.device) for c in chunks]
    kw = dict(do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    if not keep_eos:
        kw["min_new_tokens"] = new_tokens
    gc.collect()
    load = load_avg()
    with torch.inference_mode():
        ttft_batches = []
        for enc in encs:  # prefill-only timing for TTFT
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=1, **{k: v for k, v in kw.items() if k != "min_new_tokens"})
            sync(loaded.device)
            ttft_batches.append(time.perf_counter() - t)
        lat, ttft, tpot, tokens = [], [], [], 0
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            for enc, tb in zip(encs, ttft_batches):
                start = time.perf_counter() - t0
                out = model.generate(**enc, max_new_tokens=new_tokens, **kw)
                gen = out[:, enc["input_ids"].shape[1]:]
                sync(loaded.device)
                end = time.perf_counter() - t0
                for row in gen.tolist():
                    n = len(row)
                    if keep_eos and tok.eos_token_id in row:
                        n = row.index(tok.eos_token_id) + 1
                    tokens += n
                    lat.append(end)           # all requests arrive at t0; a batch's rows finish together
                    ttft.append(start + tb)   # tb: the same batch's generate(max_new_tokens=1)
                    if n > 1:
                        tpot.append((end - start - tb) / (n - 1))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Result("hf_generate", len(texts), tokens, wall, lat, ttft, tpot, mem.peak, load,
                  {"batch": batch, "ttft_note": "generate(max_new_tokens=1) on the same batch"}, cpu)


def run_peft_sequential(loaded: LoadedModel, tasks: list[Task], requests: list[EngineRequest], *,
                        keep_eos: bool = False, recompute: bool = False,
                        tokens_out: dict | None = None) -> Result:
    """PEFT, one request at a time, switching adapters. See the module docstring."""
    from peft import PeftModel

    from prompt_core.fingerprint import fingerprint
    from prompt_store.peft_io import export_peft

    tok, base = loaded.tokenizer, loaded.model
    fp = fingerprint(base)
    eos = {tok.eos_token_id} if keep_eos else set()
    used = {r.prompt.key for r in requests}
    by_key = {t.ref.key: t for t in tasks if t.ref.key in used}
    wrappers: dict[PromptKind, PeftModel] = {}
    names: dict[str, tuple[PromptKind, str]] = {}
    t_load = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (key, t) in enumerate(by_key.items()):
            kind = t.ref.spec.kind
            if kind is PromptKind.HARD:
                continue
            d = Path(tmp) / f"a{i}"
            tensors = PromptTensors(virtual=None if t.tensors.virtual is None else t.tensors.virtual.float().cpu(),
                                    prefix=None if t.tensors.prefix is None else t.tensors.prefix.float().cpu())
            export_peft(d, t.ref.spec, tensors, fp)
            name = f"a{i}"
            if kind not in wrappers:
                wrappers[kind] = PeftModel.from_pretrained(base, d, adapter_name=name).eval()
            else:
                wrappers[kind].load_adapter(d, adapter_name=name)
            names[key] = (kind, name)
    for w in wrappers.values():
        w.to(device=loaded.device, dtype=loaded.dtype)
    load_s = time.perf_counter() - t_load

    def greedy(model_fn, ids: list[int], n: int) -> list[int]:
        out: list[int] = []
        if recompute:
            for _ in range(n):
                logits = model_fn(input_ids=torch.tensor([ids + out], device=loaded.device)).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt in eos:
                    break
                out.append(nxt)
            return out
        res = model_fn(input_ids=torch.tensor([ids], device=loaded.device), use_cache=True)
        cache = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        while True:
            if nxt in eos:
                break
            out.append(nxt)
            if len(out) >= n:
                break
            res = base(input_ids=torch.tensor([[nxt]], device=loaded.device), past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
        return out

    gc.collect()
    load = load_avg()
    lat, ttft, counts, tokens = [], [], [], 0
    with torch.inference_mode(), PeakRSS() as mem, warnings_off():
        t0, c0 = time.perf_counter(), time.process_time()
        for r in requests:
            spec = r.prompt.spec
            text = spec.template.replace("{input}", r.text)
            ids = tok(text)["input_ids"]
            ts = time.perf_counter()
            if spec.kind is PromptKind.HARD:
                fn = base
            else:
                kind, name = names[r.prompt.key]
                fn = wrappers[kind]
                fn.set_adapter(name)
            out = greedy(fn, ids, r.sampling.max_new_tokens)
            te = time.perf_counter()
            tokens += len(out)
            lat.append(te - ts)
            counts.append(len(out))
            if tokens_out is not None:
                tokens_out[r.request_id] = out
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        # TTFT: one prefill per request kind on the first requests (service time, no queueing)
        for r in requests[: min(8, len(requests))]:
            spec = r.prompt.spec
            ids = tok(spec.template.replace("{input}", r.text))["input_ids"]
            fn = base if spec.kind is PromptKind.HARD else wrappers[names[r.prompt.key][0]]
            if spec.kind is not PromptKind.HARD:
                fn.set_adapter(names[r.prompt.key][1])
            ts = time.perf_counter()
            fn(input_ids=torch.tensor([ids], device=loaded.device), use_cache=True)
            sync(loaded.device)
            ttft.append(time.perf_counter() - ts)
    for w in wrappers.values():
        with contextlib.suppress(Exception):
            w.unload()
    base.__dict__.pop("peft_config", None)
    med_ttft = statistics.median(ttft) if ttft else 0.0
    tpot = [(lt - med_ttft) / (n - 1) for lt, n in zip(lat, counts) if n > 1]  # TTFT: median prefill time
    return Result("peft_sequential", len(requests), tokens, wall, lat, ttft, tpot, mem.peak, load,
                  {"adapter_load_s": load_s, "adapters": len(names),
                   "decoding": "recompute" if recompute else "kv-cache",
                   "latency_note": "service time per request (no queueing)"}, cpu)


@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(n: int = 2048, repeats: int = 10, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32) -> float:
    """Best torch.mm FLOP/s over `repeats` runs of an n x n by n x n product (the model's dtype, on its device).
    On CPU with one torch thread the product runs on this thread, so its CPU time (time.thread_time) is also used:
    it excludes the time other users' processes held the core, and the larger (stricter) figure is returned."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.thread_time()
        torch.mm(a, b)
        sync(device)
        best_wall = min(best_wall, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.thread_time() - c)
    cpu_ok = device.type == "cpu" and torch.get_num_threads() == 1 and best_cpu > 0
    return 2 * n ** 3 / (min(best_wall, best_cpu) if cpu_ok else best_wall)


def copy_bandwidth(mib: int = 256, repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """Best bytes/s of copying a `mib` MiB fp32 tensor (read + write counted)."""
    x = torch.randn(mib * 2**18, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best


def flops_per_token(model) -> tuple[float, dict]:
    """2 x non-embedding parameters + 2 x V x D (the LM head, counted once whether tied or not)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    seen, non_emb = set(), 0
    for p in model.parameters():
        if id(p) in seen or p is emb or p is head:
            continue
        seen.add(id(p))
        non_emb += p.numel()
    V, D = head.shape
    return 2 * non_emb + 2 * V * D, {"non_embedding_params": non_emb, "vocab": V, "hidden": D,
                                     "tied": head.data_ptr() == emb.data_ptr()}


# ---------------------------------------------------------------------------------------------------- reporting

def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{1000 * x:.0f}"


def print_table(results: list[Result], ref: Result | None = None, refs: dict[str, Result] | None = None) -> None:
    refs = refs or {}
    head = f"{'system':<22}{'req':>5}{'tokens':>8}{'wall s':>8}{'req/s':>8}{'tok/s':>8}" \
           f"{'tok/cpu-s':>10}{'TTFT p50':>10}{'TPOT p50':>10}{'lat p50':>9}{'p95':>7}{'p99':>7}{'RSS MiB':>9}" \
           "  ratios (tok/s)"
    print(head)
    print("-" * len(head))
    for r in results:
        s = r.summary()
        ratios = "  ".join(f"{k} {r.tps / b.tps:.2f}x" for k, b in refs.items() if b is not r and b.tps > 0)
        print(f"{r.name:<22}{r.requests:>5}{r.tokens:>8}{r.wall_s:>8.1f}{r.rps:>8.2f}{r.tps:>8.1f}"
              f"{s['tok_per_cpu_s']:>10.1f}{fmt_ms(s['ttft_p50']):>10}{fmt_ms(s['tpot_p50']):>10}{fmt_ms(s['lat_p50']):>9}"
              f"{fmt_ms(s['lat_p95']):>7}{fmt_ms(s['lat_p99']):>7}{r.peak_rss_mb:>9.0f}  {ratios}")
    print("(times in ms unless marked; TTFT/latency include queueing for the engine and hf; peft latency is "
          "service time per request)")


def verdict(name: str, value: float, target: float, detail: str) -> dict:
    ok = value >= target
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f} (target >= {target}) {detail}")
    return {"target": name, "value": value, "threshold": target, "pass": ok, "detail": detail}


def git_info() -> dict:
    """The commit measured: HEAD, the last commit touching the engine or prompt_core, and uncommitted changes there."""
    import subprocess
    root = Path(__file__).resolve().parents[1]

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - not a checkout
            return ""
    return {"head": git("rev-parse", "--short", "HEAD"),
            "engine_commit": git("log", "-1", "--format=%h %s", "--", "server/engine", "prompt_core"),
            "engine_dirty": bool(git("status", "--porcelain", "--", "server/engine", "prompt_core"))}


def env_info() -> dict:
    return {"git": git_info(), "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "argv": " ".join(sys.argv)}


def standard(loaded: LoadedModel, args) -> dict:
    """The standard workload and all four baselines. Returns a JSON-able dict."""
    res: dict = {"env": env_info(), "config": vars(args).copy(), "device": str(loaded.device),
                 "dtype": str(loaded.dtype)}
    g = res["env"]["git"]
    print(f"# promptserve engine benchmark  {res['env']['date_utc']}  commit {g['head']} (engine: {g['engine_commit']}"
          f"{', uncommitted changes' if g['engine_dirty'] else ''})  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  device {loaded.device} {loaded.dtype}  load {load_avg()}")
    tasks = make_tasks(loaded, args.tasks, args.virtual_tokens, seed=1)
    reqs = make_requests(tasks, args.requests, args.new_tokens)
    single_task = make_tasks(loaded, 1, args.virtual_tokens, kinds=(PromptKind.PROMPT_TUNING,), seed=2, tag="s")
    single_reqs = make_requests(single_task, args.requests, args.new_tokens, prefix="s")
    kinds = {k.value: sum(1 for t in tasks if t.ref.spec.kind is k) for k in KINDS}
    print(f"workload: {args.requests} requests over {args.tasks} tasks {kinds}, T={args.virtual_tokens} virtual "
          f"tokens, {args.new_tokens} new tokens, greedy, max batch {args.batch}, "
          f"eos {'on' if args.keep_eos else 'off'}")

    # warm-up (allocator, first-call paths), not timed. Unless --cold, the engines then persist across repeats, as
    # in a running server, and have served every task once, so their prompt heads are cached (steady state).
    run_engine(loaded, make_requests(tasks, min(8, args.requests), 4, prefix="w"), "warmup", max_batch=args.batch)
    engines = {"mixed": None, "single": None}
    if not args.cold:
        for key, task_list in (("mixed", tasks), ("single", single_task)):
            engines[key] = new_engine(loaded, args.batch)
            run_engine(loaded, make_requests(task_list, len(task_list), 2, prefix=f"w{key}"), "warmup",
                       max_batch=args.batch, engine=engines[key])
    print(f"engines: {'cold (a fresh engine per run)' if args.cold else 'warm (each task served once before timing)'}")

    mixed_tokens: dict = {}
    runs: dict[str, list[Result]] = {"mixed": [], "single": [], "hf": []}
    for i in range(args.repeats):  # interleaved, best wall time kept: other users' load only ever slows a run down
        runs["mixed"].append(run_engine(loaded, reqs, "engine_mixed", max_batch=args.batch, keep_eos=args.keep_eos,
                                        tokens_out=mixed_tokens if i == 0 else None, engine=engines["mixed"]))
        runs["single"].append(run_engine(loaded, single_reqs, "engine_single_task", max_batch=args.batch,
                                         keep_eos=args.keep_eos, engine=engines["single"]))
        runs["hf"].append(run_hf_generate(loaded, [r.text for r in reqs], args.new_tokens, args.batch,
                                          keep_eos=args.keep_eos))
    best = {k: min(v, key=lambda r: r.wall_s) for k, v in runs.items()}
    for k, r in best.items():
        r.extra["walls"] = [round(x.wall_s, 2) for x in runs[k]]
    mixed, single, hf = best["mixed"], best["single"], best["hf"]
    peft_reqs = reqs[: args.peft_requests]
    peft_tokens: dict = {}
    peft = run_peft_sequential(loaded, tasks, peft_reqs, keep_eos=args.keep_eos, recompute=args.peft_recompute,
                               tokens_out=peft_tokens)
    agree = sum(1 for k, v in peft_tokens.items() if mixed_tokens.get(k) == v)
    peft.extra["token_agreement"] = f"{agree}/{len(peft_tokens)} requests generate the same tokens as the engine"
    peak = matmul_flops(args.mm_size, device=loaded.device, dtype=loaded.dtype)
    fpt, fdetail = flops_per_token(loaded.model)
    bound = peak / fpt
    bw = copy_bandwidth(device=loaded.device)
    wbytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bw_bound = args.batch * bw / wbytes  # decode streams every weight once per step
    print(f"\ncompute bound: torch.mm {args.mm_size}^2 {loaded.dtype} best {peak / 1e9:.1f} GFLOP/s / "
          f"{fpt / 1e9:.3f} GFLOP per token "
          f"({fdetail['non_embedding_params'] / 1e6:.1f}M non-embedding params, V x D = {fdetail['vocab']} x "
          f"{fdetail['hidden']}) = {bound:.0f} tokens/s ({torch.get_num_threads()} thread(s))")
    print(f"memory: copy {bw / 1e9:.1f} GB/s; weights {wbytes / 2**20:.0f} MiB streamed per decode step -> at most "
          f"{bw_bound:.0f} tokens/s at batch {args.batch} (not the bottleneck when this exceeds the compute bound)")
    print(f"PEFT: {len(peft_reqs)} of {len(reqs)} requests served one at a time ({peft.extra['decoding']}); its "
          f"tokens/s is the estimate for the whole workload. {peft.extra['token_agreement']}. Adapter loading "
          f"({peft.extra['adapters']} adapters) took {peft.extra['adapter_load_s']:.1f} s, not counted.\n")
    refs = {"/single": single, "/hf": hf, "/peft": peft}
    print_table([mixed, single, hf, peft], refs=refs)
    for r in (mixed, single):
        e = r.extra
        print(f"  {r.name}: {e['steps']} steps, prefill {e['prefill_s']:.1f} s, decode {e['decode_s']:.1f} s, "
              f"other (scheduling, detokenization) {e['other_s']:.1f} s; decode {e['decode_tok_per_s']:.0f} tok/s "
              f"overall, {e['decode_full_batch_tok_per_s']:.0f} tok/s at batch {args.batch} "
              f"({e['decode_full_batch_step_ms']:.0f} ms/step, {e['decode_full_batch_steps']} steps) = "
              f"{e['decode_full_batch_tok_per_s'] / bound:.0%} of the compute bound")
    if loaded.device.type == "cuda":
        print(f"  peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"  peak RSS of the process (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print()
    cpu = lambda a, b: f"; per CPU-second {a.tokens / a.cpu_s / (b.tokens / b.cpu_s):.2f}"  # noqa: E731
    dec, dec_cpu = mixed.extra["decode_full_batch_tok_per_s"], mixed.extra["decode_full_batch_tok_per_cpu_s"]
    verdicts = [
        verdict("mixed / single-task throughput", mixed.tps / single.tps, 0.95,
                f"({mixed.tps:.1f} vs {single.tps:.1f} tok/s{cpu(mixed, single)})"),
        verdict("mixed / PEFT one-at-a-time", mixed.tps / peft.tps, 10.0,
                f"({mixed.tps:.1f} vs {peft.tps:.1f} tok/s{cpu(mixed, peft)})"),
        verdict("mixed / HF batched generate (no prompts)", mixed.tps / hf.tps, 1.0,
                f"({mixed.tps:.1f} vs {hf.tps:.1f} tok/s{cpu(mixed, hf)})"),
        verdict(f"decode at batch {args.batch} / compute bound", dec / bound, 0.5,
                f"({dec:.0f} vs {bound:.0f} tok/s; per CPU-second {dec_cpu / bound:.2f})"),
    ]
    res.update({"results": {r.name: r.summary() for r in (mixed, single, hf, peft)},
                "bound": {"matmul_flops": peak, "flops_per_token": fpt, "tok_per_s": bound, "copy_bytes_per_s": bw,
                          "weight_bytes": wbytes, "bandwidth_tok_per_s_at_batch": bw_bound, **fdetail},
                "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if loaded.device.type == "cuda"
                else None,
                "verdicts": verdicts, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "load_end": load_avg()})
    return res


def tasks_in_flight(loaded: LoadedModel, args, counts=(1, 512)) -> dict:
    """The same requests (short inputs) over 1 vs N distinct prompt-tuning tasks (one kind and T for every point, so
    only the number of distinct prompts changes; N <= requests)."""
    out = {}
    n_req = max(max(counts), args.requests) if args.tasks_requests is None else args.tasks_requests
    for n in counts:
        tasks = make_tasks(loaded, n, args.virtual_tokens, kinds=(PromptKind.PROMPT_TUNING,), seed=10 + n,
                           tag=f"f{n}_")
        reqs = make_requests(tasks, n_req, args.tasks_new_tokens, prefix=f"f{n}_", texts=CLASSIFY_TEXTS)
        r = run_engine(loaded, reqs, f"tasks_{n}", max_batch=args.batch, keep_eos=args.keep_eos)
        out[n] = r
        print(f"  {n:>4} distinct tasks: {n_req} requests x {args.tasks_new_tokens} tokens, {r.tps:.1f} tok/s, "
              f"{r.rps:.2f} req/s, {r.tokens / r.cpu_s:.1f} tok/cpu-s, load {r.load}")
    return out


def classify_vs_generate(loaded: LoadedModel, args) -> dict:
    """Classify (every label scored in one prefill) vs the same number of separate generate calls with
    max_new_tokens = the longest verbalizer's token count, all through the engine, batched."""
    tasks = make_tasks(loaded, args.tasks, args.virtual_tokens, seed=3, labels=True, tag="c")
    longest = max(len(loaded.tokenizer(v, add_special_tokens=False)["input_ids"]) for v in CLASSIFY_LABELS.values())
    cls = run_engine(loaded, make_requests(tasks, args.requests, 1, prefix="c", mode="classify",
                                           texts=CLASSIFY_TEXTS), "classify", max_batch=args.batch)
    gen = run_engine(loaded, make_requests(tasks, args.requests, longest, prefix="g", texts=CLASSIFY_TEXTS),
                     f"generate_{longest}tok", max_batch=args.batch)
    print(f"  classify, {len(CLASSIFY_LABELS)} labels (longest verbalizer {longest} tokens): {cls.rps:.1f} req/s "
          f"vs {args.requests} generate calls of {longest} tokens: {gen.rps:.1f} req/s -> {cls.rps / gen.rps:.2f}x")
    return {"classify": cls, "generate": gen, "longest_verbalizer_tokens": longest}


def profile_decode(loaded: LoadedModel, args, steps: int = 8, top: int = 25) -> dict:
    """torch.profiler over `steps` engine steps that only decode, at batch `--batch` (the standard mixed workload,
    prefilled first). Engine stages are marked with record_function by wrapping them from here (no engine edits):
    model body, lm_head, sampler, build_decode, cache update, detokenize/append."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import server.engine.model_runner as MR

    tasks = make_tasks(loaded, args.tasks, args.virtual_tokens, seed=1)
    reqs = make_requests(tasks, args.batch, steps + 8, prefix="p")
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=args.batch), max_new_tokens=4096))
    engine.eos_ids = frozenset()

    def mark(name, fn):
        def wrapped(*a, **kw):
            with record_function(name):
                return fn(*a, **kw)
        return wrapped

    F = MR.F
    patches = [(MR, "build_decode"), (MR, "sample"), (F, "hidden_states"), (F, "logits")]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in patches]
    for mod, attr, fn in saved:
        setattr(mod, attr, mark(f"## {attr}", fn))
    engine.runner.cache.update = mark("## cache.update", engine.runner.cache.update)
    engine.output_processor.append_token = mark("## append_token+detokenize", engine.output_processor.append_token)
    engine._release_finished = mark("## release", engine._release_finished)
    try:
        seqs = [engine.add_request(r) for r in reqs]
        plans = [sq.plan for sq in seqs]
        Q = max(pl.num_queries for pl in plans)
        padding = {"rows": len(plans), "Q": Q, "real_queries": sum(pl.num_queries for pl in plans),
                   "computed_queries": len(plans) * Q}
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as pprof:
            t = time.perf_counter()
            with record_function("## engine.step"):
                engine.step()  # the prefill of every request (+ the first decode)
            prefill_wall = time.perf_counter() - t
        for _ in range(2):
            engine.step()
        load = load_avg()
        t = time.perf_counter()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loaded.device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=True) as prof:
            for _ in range(steps):
                with record_function("## engine.step"):
                    engine.step()
        wall = time.perf_counter() - t
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
    ev = prof.key_averages()
    total_us = wall * 1e6
    stages = sorted(({"name": e.key, "cpu_total_ms": e.cpu_time_total / 1e3 / steps,
                      "pct": 100 * e.cpu_time_total / total_us} for e in ev if e.key.startswith("## ")),
                    key=lambda d: -d["pct"])
    ops = sorted(({"name": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps,
                   "pct": 100 * e.self_cpu_time_total / total_us} for e in ev if not e.key.startswith("## ")),
                 key=lambda d: -d["pct"])[:top]
    shapes = sorted(({"name": e.key, "shapes": str(e.input_shapes)[:120],
                      "self_ms": e.self_cpu_time_total / 1e3 / steps,
                      "pct": 100 * e.self_cpu_time_total / total_us}
                     for e in prof.key_averages(group_by_input_shape=True) if not e.key.startswith("## ")),
                    key=lambda d: -d["pct"])[:15]
    ops_self = sum(e.self_cpu_time_total for e in ev if not e.key.startswith("## ")) / 1e3 / steps
    pev = pprof.key_averages()
    pstages = sorted(({"name": e.key, "ms": e.cpu_time_total / 1e3, "pct": 100 * e.cpu_time_total / 1e6 / prefill_wall}
                      for e in pev if e.key.startswith("## ")), key=lambda d: -d["pct"])
    pops = sorted(({"name": e.key, "ms": e.self_cpu_time_total / 1e3,
                    "pct": 100 * e.self_cpu_time_total / 1e6 / prefill_wall}
                   for e in pev if not e.key.startswith("## ")), key=lambda d: -d["pct"])[:10]
    res = {"batch": args.batch, "steps": steps, "step_ms": 1000 * wall / steps, "load": load, "stages": stages,
           "ops": ops, "op_shapes": shapes, "ops_self_ms": ops_self,
           "prefill": {"wall_ms": 1000 * prefill_wall, "stages": pstages, "ops": pops, **padding}}
    print(f"\nprofile: {steps} decode-only engine steps at batch {args.batch}: {res['step_ms']:.0f} ms/step "
          f"(load {load})")
    print("  stages (inclusive CPU time, % of step wall time):")
    for d in stages:
        print(f"    {d['name'][3:]:<28}{d['cpu_total_ms']:>9.1f} ms {d['pct']:>6.1f}%")
    print("  top aten ops by self CPU time (% of step wall time):")
    for d in ops:
        print(f"    {d['name']:<40}{d['self_ms']:>9.2f} ms {d['pct']:>6.1f}%  x{d['calls']}")
    print(f"  aten ops' self time {ops_self:.1f} ms/step of {res['step_ms']:.0f} ms wall; the rest is Python, "
          f"dispatch and time other processes held the CPU")
    print(f"\n  prefill step ({padding['rows']} requests, Q={Q} queries per row, {padding['real_queries']} real of "
          f"{padding['computed_queries']} computed = {padding['real_queries'] / padding['computed_queries']:.0%}): "
          f"{1000 * prefill_wall:.0f} ms")
    for d in pstages:
        print(f"    {d['name'][3:]:<28}{d['ms']:>9.1f} ms {d['pct']:>6.1f}%")
    for d in pops:
        print(f"    {d['name']:<40}{d['ms']:>9.1f} ms {d['pct']:>6.1f}%")
    print("  top (op, input shapes):")
    for d in shapes:
        print(f"    {d['name']:<28}{d['self_ms']:>9.2f} ms {d['pct']:>6.1f}%  {d['shapes']}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (~1-2 min): 16 requests, 8 tasks, 16 tokens")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--virtual-tokens", type=int, default=16, help="T of every soft prompt in the standard workload")
    p.add_argument("--batch", type=int, default=64, help="engine max_batch_size and the hf generate batch")
    p.add_argument("--peft-requests", type=int, default=16, help="requests of the PEFT sequential baseline")
    p.add_argument("--peft-recompute", action="store_true", help="PEFT greedy loop recomputes the whole sequence")
    p.add_argument("--keep-eos", action="store_true", help="let requests stop at EOS (token counts then differ)")
    p.add_argument("--cold", action="store_true", help="a fresh engine per timed run: every task's prompt head is "
                   "computed inside the timed run (default: warm engines that served each task once, as a server)")
    p.add_argument("--no-head-cache", action="store_true",
                   help="engines without the prompt-head cache (every row prefills its virtual tokens and template)")
    p.add_argument("--mm-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=1,
                   help="run engine mixed / single / hf this many times, interleaved, and keep each one's best")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default, one per core). On a shared, oversubscribed machine use 1: "
                        "with 2 threads and load > cores, OpenMP barriers make every op ~10x slower")
    p.add_argument("--with-tasks", action="store_true", help="also: 1 vs 512 distinct tasks")
    p.add_argument("--tasks-requests", type=int, default=None, help="requests for --with-tasks (default 512)")
    p.add_argument("--tasks-new-tokens", type=int, default=8)
    p.add_argument("--with-classify", action="store_true", help="also: classify vs separate generate calls")
    p.add_argument("--profile", action="store_true", help="also: torch.profiler over decode steps at --batch")
    p.add_argument("--profile-only", action="store_true", help="only the profile (no workload, no baselines)")
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args(argv)
    if args.no_head_cache:
        global PREFIX_CACHING
        PREFIX_CACHING = False
    if args.quick:
        args.requests, args.tasks, args.new_tokens, args.peft_requests = 16, 8, 16, 4
        args.batch = min(args.batch, 16)
        args.tasks_requests = args.tasks_requests or 64
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.getloadavg()[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"WARNING: load average {load_avg()} exceeds {os.cpu_count()} CPUs and torch uses "
              f"{torch.get_num_threads()} threads: expect very noisy, much slower numbers (try --threads 1)")
    torch.manual_seed(0)
    with warnings_off():
        loaded = load_model(None if args.model == "default" else args.model, args.device, args.dtype)
    if args.profile_only:
        res = {"env": env_info(), "profile": profile_decode(loaded, args)}
        if args.json:
            args.json.write_text(json.dumps(res, indent=1, default=str))
        return 0
    res = standard(loaded, args)
    if args.with_tasks:
        print("\ndistinct tasks in flight:")
        tf = tasks_in_flight(loaded, args, (1, min(512, args.tasks_requests or 512)))
        (a, b) = tf.values()
        res["tasks_in_flight"] = {str(k): v.summary() for k, v in tf.items()}
        res["verdicts"].append(verdict("many tasks / 1 task", b.tps / a.tps, 0.9,
                                       f"({b.tps:.1f} vs {a.tps:.1f} tok/s; per CPU-second "
                                       f"{(b.tokens / b.cpu_s) / (a.tokens / a.cpu_s):.2f})"))
    if args.with_classify:
        print("\nclassify:")
        c = classify_vs_generate(loaded, args)
        res["classify"] = {"classify": c["classify"].summary(), "generate": c["generate"].summary(),
                           "longest_verbalizer_tokens": c["longest_verbalizer_tokens"]}
        cc, cg = c["classify"], c["generate"]
        res["verdicts"].append(verdict("classify / separate generate calls (req/s)", cc.rps / cg.rps, 1.0,
                                       f"({cc.rps:.1f} vs {cg.rps:.1f} req/s; per CPU-second "
                                       f"{(cc.requests / cc.cpu_s) / (cg.requests / cg.cpu_s):.2f})"))
    if args.profile:
        res["profile"] = profile_decode(loaded, args)
    print(f"\nload average at the end: {load_avg()} on {os.cpu_count()} CPUs (other users' jobs make numbers noisy)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
