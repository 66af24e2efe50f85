"""In-process engine benchmark for issue 6, with every figure next to baselines measured in the same run.

    python -m scripts.bench_engine --threads 1   # the standard workload (64 requests, 32 tasks, 32 new tokens),
                                                 # ~2-4 min
    python -m scripts.bench_engine --threads 1 --quick    # smaller: ~1 min
    python -m scripts.bench_engine --profile-only --batch 16   # only the torch.profiler table of engine steps
    python -m scripts.bench_engine --help

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
scripts/bench_report.py. The library behind this CLI is scripts/bench/ (workload, baselines, profile, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from prompt_core.model import load_model
from scripts.bench import workload
from scripts.bench.environment import env_info, warn_if_oversubscribed, warnings_off
from scripts.bench.profile import profile_steps
from scripts.bench.standard import classify_section, standard, tasks_in_flight, verdict
from scripts.common import load_avg


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
    p.add_argument("--profile", action="store_true", help="also: torch.profiler over engine steps at --batch")
    p.add_argument("--profile-only", action="store_true", help="only the profile (no workload, no baselines)")
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args(argv)
    if args.no_head_cache:
        workload.PREFIX_CACHING = False
    if args.quick:
        args.requests, args.tasks, args.new_tokens, args.peft_requests = 16, 8, 16, 4
        args.batch = min(args.batch, 16)
        args.tasks_requests = args.tasks_requests or 64
    if args.threads:
        torch.set_num_threads(args.threads)
    warn_if_oversubscribed()
    torch.manual_seed(0)
    with warnings_off():
        loaded = load_model(None if args.model == "default" else args.model, args.device, args.dtype)
    if args.profile_only:
        res = {"env": env_info(), "profile": profile_steps(loaded, args)}
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
        res["classify"], classified = classify_section(loaded, args)
        res["verdicts"].append(classified)
    if args.profile:
        res["profile"] = profile_steps(loaded, args)
    print(f"\nload average at the end: {load_avg()} on {os.cpu_count()} CPUs (other users' jobs make numbers noisy)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
