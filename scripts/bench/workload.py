"""The benchmark workload: tasks of every prompt kind with random soft prompts, requests over them, and one engine
run that serves them all and times it (throughput, latency percentiles, memory, the step split).

Everything here drives the engine through its public API (`add_request`, `step`, `has_work`, `eos_ids`), so a
rewrite of what runs behind `step()` leaves the benchmark working.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from prompt_core.model import LoadedModel
from prompt_core.spec import PromptKind, PromptSpec, PromptTensors, make_labels
from scripts.common import load_avg, pct  # pct: the one percentile definition of every report
from server.engine.config import EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.request import EngineRequest, PromptRef, RequestOutput, SamplingParams

from .inputs import CLASSIFY_LABELS, TEXTS

KINDS = (PromptKind.HARD, PromptKind.PROMPT_TUNING, PromptKind.P_TUNING, PromptKind.PREFIX_TUNING)
PREFIX_CACHING = True  # bench_engine.py --no-head-cache turns the prefix cache off


# ---------------------------------------------------------------------------------------------------- tasks

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


# ---------------------------------------------------------------------------------------------------- measuring

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


@dataclass
class StepTimer:
    """Whole engine steps timed from outside: wall and CPU seconds of each, and whether it prefilled, seen in what
    it returns: a step prefilled when some request got its first output in it; a decode-only step returns one
    output per running row. Not seen: a request resumed after a preemption (it prefills again without a first
    output; one tenant, as here, is never preempted), and a step that computes only part of a long prompt where
    the engine chunks prefills (it counts as decode-only, with fewer rows than a full batch)."""
    prefill: list[tuple[float, float]] = field(default_factory=list)    # (wall s, CPU s) of steps that prefilled
    decode: list[tuple[int, float, float]] = field(default_factory=list)  # (rows, wall s, CPU s), decode-only
    seen: set[str] = field(default_factory=set)                           # requests with an output so far

    def step(self, engine: LLMEngine) -> list[RequestOutput]:
        t, c = time.perf_counter(), time.process_time()
        outs = engine.step()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        new = {o.request_id for o in outs} - self.seen
        if new:
            self.seen |= new
            self.prefill.append((wall, cpu))
        else:
            self.decode.append((len(outs), wall, cpu))
        return outs

    def split(self, wall: float, max_batch: int) -> dict:
        """The step split of a run of `wall` seconds, with decode-only steps at a full batch on their own."""
        prefill_s = sum(w for w, _ in self.prefill)
        decode_s = sum(w for _, w, _ in self.decode)
        rows = sum(n for n, _, _ in self.decode)
        full = [w for n, w, _ in self.decode if n == max_batch]
        full_cpu = [c for n, _, c in self.decode if n == max_batch]
        nan = float("nan")
        return {"step_timing": "whole steps", "prefill_s": prefill_s, "decode_s": decode_s,
                "other_s": wall - prefill_s - decode_s,
                "decode_tok_per_s": rows / decode_s if decode_s else nan,
                "decode_full_batch_steps": len(full),
                "decode_full_batch_tok_per_s": max_batch * len(full) / sum(full) if full else nan,
                "decode_full_batch_step_ms": 1000 * statistics.median(full) if full else nan,
                "decode_full_batch_tok_per_cpu_s": max_batch * len(full_cpu) / sum(full_cpu)
                if full_cpu and sum(full_cpu) else nan}


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
    gc.collect()
    load = load_avg()
    lat, ttft, tpot, tokens, n_steps = [], [], [], 0, 0
    seqs, timer = {}, StepTimer()
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        for r in requests:
            seqs[r.request_id] = engine.add_request(r)
        while engine.has_work():
            outs = timer.step(engine)
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
    extra = {"steps": n_steps, **timer.split(wall, max_batch)}
    return Result(name, len(requests), tokens, wall, lat, ttft, tpot, mem.peak, load, extra, cpu)
