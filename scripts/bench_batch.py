#!/usr/bin/env python
"""Interactive latency beside a batch (issue 25): p95 time to first token and time per output token of a light
interactive load with no batch, then while a large batch runs on the same server, then with no batch again.

    python -m scripts.bench_batch                                   # default model, --batch-share 0
    python -m scripts.bench_batch --batch-share 0 --requests 20 --json out.json

It starts `python -m server` (scripts/common.py ServerProcess), makes a hard generate task, and sends Poisson
arrivals at `--rate` requests/s of a streamed greedy generate of `--max-new-tokens` (ignore_eos, so every request
has the same length); TTFT is the time to the first `token` event, TPOT the mean gap between the later ones. Phase
"alone": no batch. Phase "batch": a batch of `--batch-lines` generate lines of `--batch-tokens` tokens runs (it
is started first, and the phase begins once lines are being answered); after the phase the batch's progress is
read, and it is cancelled. Phase "after": no batch again (drift of a shared machine shows as alone vs after).
Ratios are p95 with the batch over p95 of the two phases without. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from scripts.common import ServerProcess, command_line, load_avg, pct

TEXTS = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?",
         "What do bees make?", "Which planet is red?", "What is two plus two?"]
TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"


async def one(c: httpx.AsyncClient, text: str, tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of one streamed generate."""
    t0, times = time.perf_counter(), []
    async with c.stream("POST", "/v1/tasks/bench/generate", json={"input": text, "max_new_tokens": tokens,
                                                                 "ignore_eos": True, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("event: token"):
                times.append(time.perf_counter())
    return times[0] - t0, (times[-1] - times[0]) / max(1, len(times) - 1)


async def open_loop(url: str, rate: float, n: int, tokens: int, seed: int) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(c, TEXTS[i % len(TEXTS)], tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def summary(samples: list[tuple[float, float]]) -> dict:
    ttft, tpot = [s[0] for s in samples], [s[1] for s in samples]
    return {"n": len(samples), "ttft_ms": sorted(round(1000 * x) for x in ttft),
            "ttft_p50_ms": round(1000 * pct(ttft, 50), 1), "ttft_p95_ms": round(1000 * pct(ttft, 95), 1),
            "tpot_p50_ms": round(1000 * pct(tpot, 50), 1), "tpot_p95_ms": round(1000 * pct(tpot, 95), 1)}


def metric(c: httpx.Client, series: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


def batch_tokens(c: httpx.Client) -> float:
    return metric(c, "promptserve_batch_tokens_total")


PREEMPTED = 'promptserve_preemptions_total{reason="priority"}'
ABANDONED = "promptserve_background_steps_abandoned_total"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.5, help="interactive requests/s (Poisson)")
    ap.add_argument("--requests", type=int, default=20, help="interactive requests per phase")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens of each interactive request")
    ap.add_argument("--batch-lines", type=int, default=2000)
    ap.add_argument("--batch-tokens", type=int, default=16, help="tokens of each batch line")
    ap.add_argument("--batch-share", type=float, default=0.0)
    ap.add_argument("--batch-max-in-flight", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    srv = ServerProcess(tmp / "store", "--model", a.model, "--threads", str(a.threads), "--batch-share",
                        str(a.batch_share), "--batch-max-in-flight", str(a.batch_max_in_flight),
                        "--max-batch-size", str(a.max_batch_size), "--max-batch-lines", str(a.batch_lines),
                        env={"PROMPTSERVE_DTYPE": a.dtype}, start_timeout_s=600)
    out: dict = {"command": command_line(), "load_avg_start": load_avg(),
                 "settings": {k: getattr(a, k) for k in ("model", "dtype", "threads", "rate", "requests",
                                                         "max_new_tokens", "batch_lines", "batch_tokens",
                                                         "batch_share", "batch_max_in_flight", "max_batch_size")}}
    try:
        with srv.client(timeout=600) as c:
            c.post("/v1/tasks", json={"task_id": "bench", "kind": "hard", "template": TEMPLATE}).raise_for_status()
            asyncio.run(open_loop(srv.url, 4 * a.rate, 4, a.max_new_tokens, 99))  # warm-up
            out["alone"] = summary(asyncio.run(open_loop(srv.url, a.rate, a.requests, a.max_new_tokens, 1)))
            print("alone ", {k: v for k, v in out["alone"].items() if k != "ttft_ms"}, flush=True)

            lines = "".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/tasks/bench/generate",
                                        "body": {"input": f"Write about item {i}.", "ignore_eos": True,
                                                 "max_new_tokens": a.batch_tokens}}) + "\n"
                            for i in range(a.batch_lines))
            fid = c.post("/v1/files", data={"purpose": "batch"},
                         files={"file": ("batch.jsonl", lines.encode())}).json()["id"]
            b = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/tasks/generate",
                                            "completion_window": "24h"}).json()
            deadline = time.monotonic() + 600
            while c.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"] < 1:
                assert time.monotonic() < deadline, "the batch never started"
                time.sleep(0.2)
            done0, tok0, t0 = c.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"], \
                batch_tokens(c), time.monotonic()
            pre0, ab0 = metric(c, PREEMPTED), metric(c, ABANDONED)
            out["batch"] = summary(asyncio.run(open_loop(srv.url, a.rate, a.requests, a.max_new_tokens, 1)))
            done1, tok1, t1 = c.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"], \
                batch_tokens(c), time.monotonic()
            out["batch"]["batch_lines_per_s"] = round((done1 - done0) / (t1 - t0), 2)
            out["batch"]["batch_tokens_per_s"] = round((tok1 - tok0) / (t1 - t0), 1)
            out["batch"]["preempted_rows"] = int(metric(c, PREEMPTED) - pre0)    # batch rows recomputed later
            out["batch"]["abandoned_steps"] = int(metric(c, ABANDONED) - ab0)   # batch-only steps stopped early
            print("batch ", {k: v for k, v in out["batch"].items() if k != "ttft_ms"}, flush=True)
            time.sleep(5)  # the batch alone: what idle capacity gives it
            done2, tok2, t2 = c.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"], \
                batch_tokens(c), time.monotonic()
            out["batch_idle"] = {"batch_lines_per_s": round((done2 - done1) / (t2 - t1), 2),
                                 "batch_tokens_per_s": round((tok2 - tok1) / (t2 - t1), 1)}
            print("idle  ", out["batch_idle"], flush=True)
            if done2 >= a.batch_lines:
                print("the batch ended before the phases did: give it more lines (--batch-lines)", flush=True)
            c.post(f"/v1/batches/{b['id']}/cancel")  # (a 409 if it already ended)
            deadline = time.monotonic() + 600
            while c.get(f"/v1/batches/{b['id']}").json()["status"] not in ("cancelled", "completed"):
                assert time.monotonic() < deadline, "the batch never stopped"
                time.sleep(0.2)
            out["after"] = summary(asyncio.run(open_loop(srv.url, a.rate, a.requests, a.max_new_tokens, 2)))
            print("after ", {k: v for k, v in out["after"].items() if k != "ttft_ms"}, flush=True)
        for key in ("ttft_p95_ms", "tpot_p95_ms"):
            base = (out["alone"][key] + out["after"][key]) / 2
            out[f"{key.split('_')[0]}_p95_ratio"] = round(out["batch"][key] / base, 2)
        out["load_avg_end"] = load_avg()
        print("p95 ratios: TTFT", out["ttft_p95_ratio"], "TPOT", out["tpot_p95_ratio"], flush=True)
    finally:
        srv.close(grace_s=30)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
