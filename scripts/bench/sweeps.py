"""What bench_report.py measures: the standard workload with its baselines, then the sweeps (throughput against
batch size, distinct tasks in flight and virtual-token count), classify against generate and the step profile,
all in this process; and `--rerun`, which measures one part again and merges it into saved results."""

from __future__ import annotations

import argparse
import time

import torch

from prompt_core.model import LoadedModel, load_model
from prompt_core.spec import PromptKind
from scripts.common import command_line, load_avg

from .baselines import run_hf_generate
from .environment import env_info, warnings_off
from .inputs import CLASSIFY_TEXTS
from .profile import profile_steps
from .standard import classify_section, standard, verdict
from .workload import KINDS, make_requests, make_tasks, run_engine


def measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    eargs = argparse.Namespace(
        quick=args.quick, model="default", device=args.device, dtype=args.dtype, requests=64, tasks=32,
        new_tokens=32, virtual_tokens=16, batch=64, peft_requests=16, peft_recompute=False, keep_eos=False,
        mm_size=2048, repeats=args.repeats, threads=args.threads, tasks_requests=None, tasks_new_tokens=8,
        cold=False)  # warm engines, as bench_engine.py measures by default
    if args.quick:
        eargs.requests, eargs.tasks, eargs.new_tokens, eargs.peft_requests, eargs.batch = 16, 8, 16, 4, 16
    t_start = time.time()
    with warnings_off():
        loaded = load_model(None, args.device, args.dtype)
    res = standard(loaded, eargs)
    res["command"] = command_line()

    # throughput against batch size: B requests, mixed tasks, engine and hf generate at the same batch
    print("\nsweep: batch size")
    batches = [1, 4, 8, 16] if args.quick else [1, 8, 16, 32, 64]
    tasks = make_tasks(loaded, eargs.tasks, eargs.virtual_tokens, seed=1)
    sweep_b = []
    for b in batches:
        reqs = make_requests(tasks, b, eargs.new_tokens, prefix=f"b{b}_")
        e = run_engine(loaded, reqs, f"engine_b{b}", max_batch=b)
        h = run_hf_generate(loaded, [r.text for r in reqs], eargs.new_tokens, b)
        sweep_b.append({"batch": b, "engine": e.summary(), "hf": h.summary()})
        print(f"  batch {b:>3}: engine {e.tps:6.1f} tok/s (decode {e.extra['decode_tok_per_s']:.0f}), "
              f"hf generate {h.tps:6.1f} tok/s -> {e.tps / h.tps:.2f}x  load {e.load}")
    res["sweep_batch"] = sweep_b

    sweep_tasks(loaded, eargs, res, args.quick)

    # throughput against virtual-token count (soft kinds only; T = 0 is hard prompts)
    print("\nsweep: virtual tokens")
    sweep_v = []
    for T in ([0, 8, 32] if args.quick else [0, 8, 32, 128]):
        ts = make_tasks(loaded, eargs.tasks, T, kinds=KINDS[1:], seed=200 + T, tag=f"v{T}_")
        reqs = make_requests(ts, eargs.requests, eargs.new_tokens, prefix=f"v{T}_")
        r = run_engine(loaded, reqs, f"virtual_{T}", max_batch=eargs.batch)
        sweep_v.append({"virtual_tokens": T, "engine": r.summary()})
        print(f"  T={T:>3}: {r.tps:6.1f} tok/s, TTFT p50 {1000 * r.summary()['ttft_p50']:.0f} ms  load {r.load}")
    res["sweep_virtual"] = sweep_v

    print("\nclassify")
    res["classify"], classified = classify_section(loaded, eargs)
    res["verdicts"].append(classified)
    pargs = argparse.Namespace(**{**vars(eargs), "batch": 16 if args.quick else 64})
    res["profile"] = profile_steps(loaded, pargs)
    res["total_s"] = time.time() - t_start
    res["load_end"] = load_avg()
    return res


def sweep_tasks(loaded: LoadedModel, eargs, res: dict, quick: bool) -> None:
    """Throughput against distinct tasks: the same requests (short inputs, 8 new tokens) over n prompt-tuning tasks
    (one kind, same T, so that only the number of distinct prompts changes; kind mixing is the standard workload's
    mixed-vs-single comparison)."""
    print("\nsweep: distinct tasks (prompt tuning, T = %d)" % eargs.virtual_tokens)
    counts = [1, 8, 64] if quick else [1, 8, 64, 512]
    n_req = 64 if quick else 512
    new_tok = 8
    sweep_t = []
    for n in counts:
        ts = make_tasks(loaded, n, eargs.virtual_tokens, kinds=(PromptKind.PROMPT_TUNING,), seed=100 + n,
                        tag=f"n{n}_")
        reqs = make_requests(ts, n_req, new_tok, prefix=f"n{n}_", texts=CLASSIFY_TEXTS)
        r = run_engine(loaded, reqs, f"tasks_{n}", max_batch=eargs.batch)
        sweep_t.append({"tasks": n, "requests": n_req, "new_tokens": new_tok, "kind": "prompt_tuning",
                        "engine": r.summary()})
        print(f"  {n:>4} tasks: {r.tps:6.1f} tok/s, {r.rps:5.2f} req/s, {r.tokens / r.cpu_s:.1f} tok/cpu-s  "
              f"load {r.load}")
    res["sweep_tasks"] = sweep_t
    base, last = sweep_t[0]["engine"], sweep_t[-1]["engine"]
    res["verdicts"] = [v for v in res["verdicts"] if "tasks / 1 task" not in v["target"]]
    res["verdicts"].append(verdict(
        f"{counts[-1]} tasks / 1 task", last["tok_per_s"] / base["tok_per_s"], 0.9,
        f"({last['tok_per_s']:.1f} vs {base['tok_per_s']:.1f} tok/s; per CPU-second "
        f"{last['tok_per_cpu_s'] / base['tok_per_cpu_s']:.2f})"))


def rerun(args, res: dict) -> dict:
    """Measure one part again (same settings) and merge it into saved results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = res["config"]
    eargs = argparse.Namespace(**cfg)
    with warnings_off():
        loaded = load_model(None, args.device, args.dtype)
    if args.rerun == "tasks":
        sweep_tasks(loaded, eargs, res, bool(cfg.get("quick")))
    elif args.rerun == "profile":
        res["profile"] = profile_steps(loaded, eargs)
    res.setdefault("reruns", []).append({"part": args.rerun, "date_utc": env_info()["date_utc"],
                                         "command": command_line(), "load_end": load_avg()})
    return res
