"""What batch invariance costs: decode tokens/s at batch 1, 16 and 64 for the precision `auto` serves, invariant
and with --no-batch-invariant (torch's own matmul shapes), and the other precision beside them, on the engine
in-process, in one run. On a CPU with native bf16 that is bf16 invariant / not and fp32 invariant; elsewhere fp32
invariant / not and bf16 invariant (the row kernel serves bf16 layers there).

    python -m scripts.bench_invariance [--threads 1] [--batches 1,16,64] [--new 64]

Each setting loads its own copy of the default model (the invariant form replaces its linear layers). A batch is
n requests of ~30 prompt tokens, 64 new tokens each (ignore_eos); tokens/s counts decode steps only (once every row
decodes), median over the steps. Results are kept in docs/img/raw/invariance.json
(newest first), which docs/benchmarks.md renders.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from scripts.common import REPO, command_line, load_avg


def settings(native_bf16: bool) -> tuple[dict[str, tuple[str, bool]], str]:
    """The settings compared, and the dtype `auto` serves: bf16 where the CPU has it natively (invariant, not
    invariant, and fp32 beside them); elsewhere fp32 invariant and not, and bf16 invariant beside them."""
    if native_bf16:
        return {"bf16 invariant": ("bfloat16", True), "bf16 not invariant": ("bfloat16", False),
                "fp32 invariant": ("float32", True)}, "bf16"
    return {"fp32 invariant": ("float32", True), "fp32 not invariant": ("float32", False),
            "bf16 invariant": ("bfloat16", True)}, "fp32"


def decode_rate(engine, n: int, new: int) -> float:
    from prompt_core.spec import PromptKind, PromptSpec
    from server.engine.request import EngineRequest, PromptRef, SamplingParams

    ref = PromptRef("bench@1", PromptSpec(PromptKind.HARD, 0, "{input}"))
    for i in range(n):
        engine.add_request(EngineRequest(f"r{n}-{i}-{time.monotonic()}", ref,
                                         f"Request {i}: write a long and careful story about the sea and a ship.",
                                         sampling=SamplingParams(max_new_tokens=new, temperature=0.0,
                                                                 ignore_eos=True)))
    steps = []
    while engine.has_work():
        prefilling = any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.num_waiting
        t = time.perf_counter()
        engine.step()
        rows = engine.scheduler.num_running
        if not prefilling and rows == n:
            steps.append(time.perf_counter() - t)
    return n / statistics.median(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "raw" / "invariance.json")
    args = p.parse_args()
    import torch

    from prompt_core.model import cpu_has_native_bf16, load_model
    from server.engine.config import EngineConfig, SchedulerConfig
    from server.engine.engine import LLMEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    res = {"when": time.strftime("%Y-%m-%d %H:%M"), "command": command_line(), "load_avg_start": load_avg(),
           "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(), "tokens_per_s": {}}
    compared, served = settings(cpu_has_native_bf16())
    res["served"] = served
    for name, (dtype, invariant) in compared.items():
        engine = LLMEngine(load_model(dtype=dtype, serving=True),
                           EngineConfig(scheduler=SchedulerConfig(max_batch_size=max(batches)),
                                        batch_invariant=invariant))
        assert engine.batch_invariant == invariant, engine.invariance_gaps
        decode_rate(engine, 2, 8)   # warm-up
        res["tokens_per_s"][name] = {str(n): round(decode_rate(engine, n, args.new), 1) for n in batches}
        print(name, res["tokens_per_s"][name], flush=True)
    res["load_avg_end"] = load_avg()
    base = res["tokens_per_s"][f"{served} not invariant"]
    res["invariant_over_not"] = {n: round(res["tokens_per_s"][f"{served} invariant"][n] / base[n], 3) for n in base}
    print(f"invariant {served} / not invariant {served}:", res["invariant_over_not"])
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    runs.insert(0, res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
