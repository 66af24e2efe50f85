"""Regenerate docs/benchmarks.md and its plots (docs/img/bench_*.png) from one run:

    .venv/bin/python -m scripts.bench_report --threads 1           # full: ~10 min on a quiet 2-core box, ~18 loaded
    .venv/bin/python -m scripts.bench_report --threads 1 --quick   # smaller sizes, ~3-7 min (to check the pipeline)

It runs, in this process and on this machine: the standard workload with its four baselines (scripts/bench_engine.py),
the sweeps (throughput against batch size, distinct tasks in flight, virtual-token count), latency percentiles,
classify against separate generate calls, and a torch.profiler breakdown of a decode step at batch 64. Then it writes
the markdown with every figure next to its baselines and PASS/FAIL per target (scripts/bench/: sweeps.py measures,
plots.py and page.py render).

The page opens with serving speed beside vLLM, the paged cache's memory and what batch invariance costs
(scripts/bench/front_page.py, from the runs bench_serving, bench_kv and bench_invariance keep in docs/img/raw/), then
the decode-speed sweep of `scripts/bench_latency.py`, rendered from its stored runs
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
import sys
from pathlib import Path

from scripts.bench import front_page
from scripts.bench.decode_page import DECODE_NOTES_BEGIN, DECODE_NOTES_END, latency_runs
from scripts.bench.page import NOTES_BEGIN, NOTES_END, kept, render
from scripts.bench.plots import plots
from scripts.common import REPO, command_line

LATENCY_RUNS = "docs/img/raw/latency_sweep*.json"  # where scripts/bench_latency.py --json keeps its runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, to check the pipeline")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default; 1 on a shared box)")
    p.add_argument("--repeats", type=int, default=2, help="standard workload: interleaved runs, best kept")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
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
            from scripts.bench.sweeps import rerun  # torch: only when measuring
            res = rerun(args, res)
        res["render_command"] = command_line()
    else:
        from scripts.bench.sweeps import measure
        res = measure(args)
    if args.save_json:
        args.save_json.write_text(json.dumps(res, indent=1, default=str))
    old = args.out.read_text() if args.out.exists() else ""
    imgs = plots(res, args.out.parent / "img")
    written = len(imgs)
    http = json.loads(args.http_json.read_text()) if args.http_json else None
    gpu = args.gpu_log.read_text() if args.gpu_log else None
    others = [json.loads(pth.read_text()) for pth in args.engine_json]
    latency = latency_runs(sorted(REPO.glob(LATENCY_RUNS)) if args.latency_json is None else args.latency_json)
    plot = latency and latency[0]["args"].get("plot")
    if plot and (REPO / plot).exists():  # the newest run's plot (each run writes the same file)
        imgs["latency_plot"] = os.path.relpath(REPO / plot, args.out.parent)
    args.out.write_text(render(res, imgs, kept(old, NOTES_BEGIN, NOTES_END), http, gpu, others, latency,
                               kept(old, DECODE_NOTES_BEGIN, DECODE_NOTES_END), front_page.load(REPO)))
    print(f"\nwrote {args.out} and {written} plots in {args.out.parent / 'img'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
