"""Serving speed side by side with vLLM, measured by vLLM's own client (`vllm bench serve`) on both servers in one run.

    python -m scripts.bench_serving --vllm-bin /path/to/venv/bin/vllm --start-vllm
    python -m scripts.bench_serving --vllm-bin VLLM --vllm-url http://127.0.0.1:8100 --ours-url http://127.0.0.1:8000

Workloads (`--dataset-name random --ignore-eos`, the default model, bf16 on both, each server on its defaults):
  single      256 in / 128 out, --max-concurrency 1, 6 requests
  saturation  64 requests of 256 / 128, all at once
  mixed       512 +-90% in, 192 +-90% out, Poisson 4 requests/s, 96 requests
and the same three on our server spread over 32 tasks of all four kinds (`--lora-modules` gives each request one
of the task ids as its model, which vLLM cannot serve at all). Start-up to /ready is timed for a cold start (an
empty cache directory: model conversion, kernel build, calibration) and a warm restart. Results go to
docs/img/raw/serving.json (newest first), with a plot in docs/img/bench_serving.png; `python -m
scripts.bench_report --from-json docs/img/raw/report.json` renders them at the top of docs/benchmarks.md.

Setting up the anchor (outside the repository): docs/benchmarks.md, "Serving speed beside vLLM".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from scripts.bench import front_page
from scripts.common import REPO, ServerProcess, command_line, free_port, load_avg

RESULTS = REPO / "docs" / "img" / "raw" / "serving.json"
WORKLOADS = {
    "single": ["--random-input-len", "256", "--random-output-len", "128", "--max-concurrency", "1",
               "--num-prompts", "6"],
    "saturation": ["--random-input-len", "256", "--random-output-len", "128", "--num-prompts", "64",
                   "--request-rate", "inf"],
    "mixed": ["--random-input-len", "512", "--random-output-len", "192", "--random-range-ratio", "0.9",
              "--request-rate", "4", "--num-prompts", "96"],
}
KEEP = ("completed", "failed", "duration", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "total_output_tokens")


def model_dir() -> Path:
    from prompt_core.model import ensure_default_model_dir

    return ensure_default_model_dir()


def wait_ready(url: str, path: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready within {timeout_s} s")


def bench(vllm: str, url: str, name: str, extra: list[str], out_dir: Path, label: str) -> dict:
    """One `vllm bench serve` run; its own JSON result, the fields we report."""
    fname = f"{label}-{name}.json"
    cmd = [vllm, "bench", "serve", "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
           "--model", "default", "--tokenizer", str(model_dir()), "--dataset-name", "random", "--ignore-eos",
           "--seed", "0", "--save-result", "--result-dir", str(out_dir), "--result-filename", fname,
           "--disable-tqdm", *WORKLOADS[name], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not (out_dir / fname).is_file():
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    data = json.loads((out_dir / fname).read_text())
    return {k: data.get(k) for k in KEEP}


def start_vllm(vllm: str, port: int, dtype: str) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_KVCACHE_SPACE": "4"}
    t0 = time.monotonic()
    proc = subprocess.Popen([vllm, "serve", str(model_dir()), "--served-model-name", "default", "--dtype",
                             dtype, "--max-model-len", "4096", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}", "/v1/models", 900)
    return proc, time.monotonic() - t0


def start_ours(cache: Path, store: Path, *args: str) -> tuple[ServerProcess, float, dict]:
    t0 = time.monotonic()
    server = ServerProcess(store, *args, env={"PROMPTSERVE_DTYPE": "auto", "PROMPTSERVE_CACHE": str(cache)},
                           start_timeout_s=900)
    wait_ready(server.url, "/ready", 900)
    ready = httpx.get(server.url + "/ready").json()
    return server, time.monotonic() - t0, ready


def make_tasks(url: str, n: int) -> list[str]:
    from scripts.bench_http import build_tasks

    ids = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for tid, body, blob in build_tasks(n, 8, "bench-", "default"):
            if body is not None:
                r = c.post("/v1/tasks", json=body)
            else:
                r = c.post("/v1/tasks", data={"task_id": tid, "metadata": json.dumps({"task_type": "generate"})},
                           files={"adapter": (f"{tid}.zip", blob, "application/zip")})
            if r.status_code not in (200, 201, 409):
                raise RuntimeError(f"creating {tid}: {r.status_code} {r.text[:300]}")
            ids.append(tid)
    return ids


def run(args) -> dict:
    import torch

    res = {"when": time.strftime("%Y-%m-%d %H:%M"), "command": command_line(), "load_avg_start": load_avg(),
           "cpu": torch.backends.cpu.get_cpu_capability(), "vllm_dtype": args.vllm_dtype,
           "ours": {}, "ours_tasks": {}, "vllm": {}}
    out_dir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    vproc = None
    try:
        ours = None
        if args.ours_url:
            url = args.ours_url
        else:
            cache, store = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
            shutil.copytree(model_dir().parent, cache / "models")  # the converted model: cold is kernel + checks
            ours, res["ours_ready_cold_s"], res["ours_ready"] = start_ours(cache, store)
            ours.close(grace_s=10)
            ours, res["ours_ready_warm_s"], _ = start_ours(cache, store)
            url = ours.url
        for name in args.workloads:
            res["ours"][name] = bench(args.vllm_bin, url, name, [], out_dir, "ours")
            print("ours", name, res["ours"][name], flush=True)
        if args.tasks:
            ids = make_tasks(url, args.tasks)
            for name in args.workloads:
                res["ours_tasks"][name] = bench(args.vllm_bin, url, name, ["--lora-modules", *ids], out_dir,
                                                "ours-tasks")
                print("ours, 32 tasks", name, res["ours_tasks"][name], flush=True)
        if ours is not None:
            ours.close(grace_s=10)
        vurl = args.vllm_url
        try:
            if args.start_vllm:
                port = free_port()
                vproc, res["vllm_ready_s"] = start_vllm(args.vllm_bin, port, args.vllm_dtype)
                vurl = f"http://127.0.0.1:{port}"
            if vurl:
                for name in args.workloads:
                    res["vllm"][name] = bench(args.vllm_bin, vurl, name, [], out_dir, "vllm")
                    print("vllm", name, res["vllm"][name], flush=True)
        except RuntimeError as e:  # keep our figures; the table shows '-' where vLLM gave none
            res["vllm_error"] = str(e)[-2000:]
            print("vllm failed:", e, flush=True)
    finally:
        if vproc is not None:
            vproc.terminate()
            vproc.wait(60)
    res["load_avg_end"] = load_avg()
    return res


def plot(run: dict, path: Path) -> None:
    """Output tokens/s per workload: vLLM-CPU, ours, ours over 32 tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in WORKLOADS if n in run["ours"]]
    series = [("vLLM-CPU", run["vllm"]), ("promptserve", run["ours"]), ("promptserve, 32 tasks", run["ours_tasks"])]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (label, data) in enumerate(series):
        ax.bar([x + 0.27 * (i - 1) for x in range(len(names))],
               [(data.get(n) or {}).get("output_throughput") or 0 for n in names], 0.27, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"vllm bench serve, default model, ours {run.get('ours_ready', {}).get('dtype', '?')}, vLLM "
                 f"{run.get('vllm_dtype', 'bfloat16')} ({run['when']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-bin", default=shutil.which("vllm") or "vllm", help="the vllm command (its own venv)")
    p.add_argument("--vllm-url", help="a running vLLM server")
    p.add_argument("--start-vllm", action="store_true", help="start vLLM with the documented settings")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM's --dtype (the documented setting: bfloat16)")
    p.add_argument("--ours-url", help="a running server of ours (default: start one, cold then warm)")
    p.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    p.add_argument("--tasks", type=int, default=32, help="also run the workloads over this many tasks (0: skip)")
    p.add_argument("--render", action="store_true", help="print the table of the stored runs")
    args = p.parse_args()
    runs = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    if not args.render:
        runs.insert(0, run(args))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(runs, indent=1) + "\n")
        plot(runs[0], REPO / "docs" / front_page.SERVING_PLOT)
    print("\n".join(front_page.serving(runs, plot=False)))


if __name__ == "__main__":
    main()
