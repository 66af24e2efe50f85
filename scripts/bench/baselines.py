"""The baselines every engine figure stands next to, all measured in the same process and run: transformers'
batched `generate` with no prompts, PEFT serving one request at a time, and the compute and memory-bandwidth bounds
of this machine (see bench_engine.py's help for what each one means)."""

from __future__ import annotations

import contextlib
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prompt_core.model import LoadedModel
from prompt_core.spec import PromptKind, PromptTensors
from scripts.common import load_avg
from server.engine.request import EngineRequest

from .environment import sync, warnings_off
from .workload import PeakRSS, Result, Task

# ---------------------------------------------------------------------------------------------------- systems

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


# ---------------------------------------------------------------------------------------------------- bounds

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
