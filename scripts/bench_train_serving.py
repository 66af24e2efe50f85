"""Serving while training (issue 14): the latency of a light open-loop load with no job, then while a fine-tuning
job trains on the same resident model, then how fast the job trains on its own.

    .venv/bin/python -m scripts.bench_train_serving                        # default model, emotion example
    .venv/bin/python -m scripts.bench_train_serving --rate 1 --requests 40 --training-share 0 --json out.json

It starts the server in-process (create_app + uvicorn on loopback), makes a hard generate task, uploads
training/examples/emotion/train.jsonl and sends Poisson arrivals at `--rate` requests/s of a short greedy generate
(`--max-new-tokens`). Phase "alone": no job. Phase "training": a prompt-tuning job (many epochs) trains while the same
load runs; the job is cancelled afterwards. Phase "idle": the job's seconds per optimizer step with no load. Reports
p50/p95/p99 latency per phase and the p95 ratio. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from scripts.common import REPO, pct  # pct: the one percentile definition of every report
from server.config import Settings
from server.main import create_app

TEXTS = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?",
         "What do bees make?", "Which planet is red?", "What is two plus two?"]


async def open_loop(url: str, rate: float, n: int, max_new_tokens: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def one(i: int) -> None:
            t0 = time.perf_counter()
            r = await c.post("/v1/tasks/bench-qa/generate", json={"input": TEXTS[i % len(TEXTS)],
                                                                   "max_new_tokens": max_new_tokens})
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)

        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return lat


def summary(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": round(1000 * pct(lat, 50), 1), "p95_ms": round(1000 * pct(lat, 95), 1),
            "p99_ms": round(1000 * pct(lat, 99), 1), "mean_ms": round(1000 * sum(lat) / len(lat), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s of the light load")
    ap.add_argument("--requests", type=int, default=40, help="requests per phase")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--training-share", type=float, default=None, help="--training-share of the server")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--idle-s", type=float, default=20.0, help="seconds the job trains alone (phase idle)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    extra = {"training_share": a.training_share} if a.training_share is not None else {}
    settings = Settings(store=tmp / "store", model=a.model, device=a.device, threads=a.threads, **extra)
    app = create_app(settings)
    rt = app.state.runtime
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    out: dict = {"settings": {"model": a.model, "device": a.device, "threads": a.threads, "rate": a.rate,
                              "requests": a.requests, "max_new_tokens": a.max_new_tokens,
                              "training_share": settings.training_share, "batch_size": a.batch_size}}
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            c.post("/v1/tasks", json={"task_id": "bench-qa", "kind": "hard",
                                      "template": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"}
                   ).raise_for_status()
            data = (REPO / "training/examples/emotion/train.jsonl").read_bytes()
            fid = c.post("/v1/files", data={"purpose": "fine-tune"},
                         files={"file": ("emotion.jsonl", data)}).json()["id"]
            asyncio.run(open_loop(url, 4 * a.rate, 8, a.max_new_tokens, 99))  # warm-up
            out["alone"] = summary(asyncio.run(open_loop(url, a.rate, a.requests, a.max_new_tokens, 1)))
            print("alone   ", out["alone"], flush=True)

            job = c.post("/v1/fine_tuning/jobs", json={
                "model": "default", "training_file": fid, "seed": 0,
                "method": {"type": "prompt_tuning", "prompt_tuning": {
                    "template": "Sentence: {input}\nEmotion:",
                    "hyperparameters": {"n_epochs": 1000, "patience": 1000, "batch_size": a.batch_size}}}}).json()
            while c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["step"] < 1:
                time.sleep(0.2)
            s0, t0 = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["step"], time.monotonic()
            out["training"] = summary(asyncio.run(open_loop(url, a.rate, a.requests, a.max_new_tokens, 1)))
            s1, t1 = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["step"], time.monotonic()
            out["training"]["job_steps_per_s"] = round((s1 - s0) / (t1 - t0), 3)
            print("training", out["training"], flush=True)
            time.sleep(a.idle_s)
            s2, t2 = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["step"], time.monotonic()
            out["idle"] = {"job_steps_per_s": round((s2 - s1) / (t2 - t1), 3)}
            print("idle    ", out["idle"], flush=True)
            c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            out["p95_ratio"] = round(out["training"]["p95_ms"] / out["alone"]["p95_ms"], 2)
            out["gate_waited_s"] = round(rt.job_runner.gate.waited_s, 1)
            print("p95 ratio", out["p95_ratio"], flush=True)
    finally:
        server.should_exit = True  # the lifespan stops the runner (checkpoint) and the engine
        thread.join(60)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
