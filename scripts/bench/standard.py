"""The standard workload (mixed tasks of every prompt kind) against every baseline, and the two side comparisons
bench_engine.py can add: many distinct tasks in flight against one, and classify against separate generate calls.
Each prints its table and PASS/FAIL verdicts and returns JSON-able numbers; nothing asserts on time."""

from __future__ import annotations

import resource

import torch

from prompt_core.model import LoadedModel
from prompt_core.spec import PromptKind
from scripts.common import load_avg

from .baselines import copy_bandwidth, flops_per_token, matmul_flops, run_hf_generate, run_peft_sequential
from .environment import env_info
from .inputs import CLASSIFY_LABELS, CLASSIFY_TEXTS
from .workload import KINDS, Result, make_requests, make_tasks, new_engine, run_engine


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
        print(f"  {r.name}: {e['steps']} steps; steps that prefilled {e['prefill_s']:.1f} s, decode-only steps "
              f"{e['decode_s']:.1f} s, outside steps {e['other_s']:.1f} s; decode {e['decode_tok_per_s']:.0f} tok/s "
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


def classify_section(loaded: LoadedModel, args) -> tuple[dict, dict]:
    """classify_vs_generate as a run records it: both summaries, and the verdict on classify's req/s."""
    c = classify_vs_generate(loaded, args)
    cc, cg = c["classify"], c["generate"]
    summaries = {"classify": cc.summary(), "generate": cg.summary(),
                 "longest_verbalizer_tokens": c["longest_verbalizer_tokens"]}
    return summaries, verdict("classify / separate generate calls (req/s)", cc.rps / cg.rps, 1.0,
                              f"({cc.rps:.1f} vs {cg.rps:.1f} req/s; per CPU-second "
                              f"{(cc.requests / cc.cpu_s) / (cg.requests / cg.cpu_s):.2f})")


# ---------------------------------------------------------------------------------------------------- printing

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
