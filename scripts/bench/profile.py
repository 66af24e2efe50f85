"""Where engine steps spend their time: torch.profiler around whole `LLMEngine.step()` calls, driven through the
engine's public API only (`add_request`, `step`, `has_work`, `eos_ids`). Nothing inside the engine is wrapped or
patched, so the profile survives any rewrite of what runs behind `step()`; the price is that it sees operators
and whole steps, not the engine's own stages (prefill, decode, sampling, detokenization inside one step)."""

from __future__ import annotations

import statistics
import time

from torch.profiler import ProfilerActivity, profile, record_function

from prompt_core.model import LoadedModel
from scripts.common import load_avg
from server.engine.config import EngineConfig, SchedulerConfig
from server.engine.engine import LLMEngine

from .workload import StepTimer, make_requests, make_tasks

STEP = "## engine.step"  # the record_function around each step: its inclusive time is the steps' own


def profile_steps(loaded: LoadedModel, args, steps: int = 8, top: int = 25) -> dict:
    """`args.batch` requests of the mixed workload (`args.tasks` tasks, T = `args.virtual_tokens`): the steps that
    prefill them all, profiled together, then two steps unprofiled, then `steps` decode-only steps profiled."""
    tasks = make_tasks(loaded, args.tasks, args.virtual_tokens, seed=1)
    reqs = make_requests(tasks, args.batch, steps + 16, prefix="p")
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_batch_size=args.batch), max_new_tokens=4096))
    engine.eos_ids = frozenset()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loaded.device.type == "cuda" else [])
    for r in reqs:
        engine.add_request(r)
    timer = StepTimer()
    with profile(activities=acts) as pprof:
        t = time.perf_counter()
        while len(timer.seen) < len(reqs) and engine.has_work():  # until every request has its first token
            with record_function(STEP):
                timer.step(engine)
        prefill_wall = time.perf_counter() - t
    for _ in range(2):
        timer.step(engine)
    load = load_avg()
    decoded = len(timer.decode)
    with profile(activities=acts, record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            with record_function(STEP):
                timer.step(engine)
        wall = time.perf_counter() - t
    timed = timer.decode[decoded:]
    res = {"batch": args.batch, "steps": steps, "step_ms": 1000 * wall / steps, "load": load, "api": "public",
           "decode_only_steps": len(timed), "rows": [n for n, _, _ in timed],
           "step_ms_p50": 1000 * statistics.median(w for _, w, _ in timed) if timed else float("nan"),
           **operator_tables(prof, wall, steps, top),
           "prefill": {"wall_ms": 1000 * prefill_wall, "rows": len(reqs), "steps": len(timer.prefill),
                       "ops": operator_tables(pprof, prefill_wall, 1, 10)["ops"]}}
    report(res)
    return res


def operator_tables(prof, wall: float, steps: int, top: int) -> dict:
    """Per-operator self CPU time (per step and as a share of the steps' wall time; on a GPU also its self device
    time), the same by input shapes, and the operators' total (the rest of the wall time is Python, dispatch and
    other processes)."""
    ev = [e for e in prof.key_averages() if e.key != STEP]
    total_us = wall * 1e6
    ops = sorted(({"name": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps,
                   "pct": 100 * e.self_cpu_time_total / total_us,
                   "device_ms": getattr(e, "self_device_time_total", 0) / 1e3 / steps} for e in ev),
                 key=lambda d: -d["pct"])[:top]
    shapes = sorted(({"name": e.key, "shapes": str(e.input_shapes)[:120],
                      "self_ms": e.self_cpu_time_total / 1e3 / steps, "pct": 100 * e.self_cpu_time_total / total_us}
                     for e in prof.key_averages(group_by_input_shape=True) if e.key != STEP),
                    key=lambda d: -d["pct"])[:15]
    return {"ops": ops, "op_shapes": shapes, "ops_self_ms": sum(e.self_cpu_time_total for e in ev) / 1e3 / steps}


def report(res: dict) -> None:
    pf = res["prefill"]
    print(f"\nprofile: {res['steps']} engine steps at batch {res['batch']} ({res['decode_only_steps']} decode-only, "
          f"rows {sorted(set(res['rows']))}): {res['step_ms']:.0f} ms/step (median {res['step_ms_p50']:.0f}; "
          f"load {res['load']})")
    print("  top ops by self CPU time (% of step wall time):")
    for d in res["ops"]:
        device = f"  device {d['device_ms']:.2f} ms" if d["device_ms"] else ""
        print(f"    {d['name']:<40}{d['self_ms']:>9.2f} ms {d['pct']:>6.1f}%  x{d['calls']}{device}")
    print(f"  ops' self time {res['ops_self_ms']:.1f} ms/step of {res['step_ms']:.0f} ms wall; the rest is Python, "
          f"dispatch and time other processes held the CPU")
    print(f"\n  prefill: {pf['rows']} requests over {pf['steps']} step(s), which also decode the rows already running: "
          f"{pf['wall_ms']:.0f} ms")
    for d in pf["ops"]:
        print(f"    {d['name']:<40}{d['self_ms']:>9.1f} ms {d['pct']:>6.1f}%")
    print("  top (op, input shapes):")
    for d in res["op_shapes"]:
        print(f"    {d['name']:<28}{d['self_ms']:>9.2f} ms {d['pct']:>6.1f}%  {d['shapes']}")
