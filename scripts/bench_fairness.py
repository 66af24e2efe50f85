"""Fairness benchmark (not CI): does a tenant flooding the server starve a light tenant?

Two tenants share one server. The light tenant sends a steady trickle of small generate requests, first on an idle
server (its baseline), then while the heavy tenant floods the server with many concurrent long requests. The script
prints the light tenant's latency percentiles in both phases and the ratio of its p95 under load to its p95 idle
(goal: at most 2x), in three set-ups:

- flood, fair share only: the heavy tenant may fill every batch row; the scheduler's weighted virtual-token counters
  give the light tenant the next free row, but without preemption it still waits for a heavy request to end;
- flood from a capped tenant: the flooding tenant's max_concurrent (auth file) is below the batch size, so rows stay
  free for others and the light request joins the batch at the next step;
- light sent as the flooder: the same trickle with the heavy tenant's key, i.e. first-come first-served without
  tenant separation, for contrast.

    python -m scripts.bench_fairness                      # starts `python -m server` itself on a free port
    python -m scripts.bench_fairness --url http://host:8000 --heavy-key K1 --light-key K2

Heavy requests are queued beyond the batch size on purpose (see --heavy-concurrency and --max-batch-size), so the
scheduler has to choose whom to admit: that choice is what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from scripts.common import ServerProcess, pct

HEAVY_KEY = "bench-heavy-key-0123456789"
CAPPED_KEY = "bench-capped-key-0123456789"  # the same flood, from a tenant capped below the batch size
LIGHT_KEY = "bench-light-key-0123456789"
TASK = "bench-fairness"
HEAVY_INPUT = "Write a long story about a dragon who learns to cook."
LIGHT_INPUT = "What is the capital of France?"


def start_server(args) -> tuple[ServerProcess, Path]:
    """`python -m server` with a fresh store and two tenants (its log is kept by ServerProcess, shown if it fails)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    auth = tmp / "auth.json"
    auth.write_text(json.dumps({
        "keys": {HEAVY_KEY: {"tenant": "heavy"}, CAPPED_KEY: {"tenant": "capped"}, LIGHT_KEY: {"tenant": "light"}},
        "tenants": {"capped": {"max_concurrent": max(1, args.max_batch_size - args.reserve)}}}))
    extra = ["--device", args.device] if args.device else []
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    server = ServerProcess(tmp / "store", "--auth-file", str(auth), "--max-batch-size", str(args.max_batch_size),
                           "--max-concurrent", "1000", "--max-queue", "4096", *extra, env=env, start_timeout_s=300)
    return server, tmp


async def one(client: httpx.AsyncClient, key: str, text: str, max_new_tokens: int) -> float | None:
    """Latency of one generate; None when refused with 429 (a flooding client then simply tries again)."""
    t0 = time.perf_counter()
    r = await client.post(f"/v1/tasks/{TASK}/generate", headers={"Authorization": f"Bearer {key}"},
                          json={"input": text, "max_new_tokens": max_new_tokens})
    if r.status_code == 429:
        return None
    r.raise_for_status()
    return time.perf_counter() - t0


async def trickle(client, key: str, n: int, interval_s: float, max_new_tokens: int) -> list[float]:
    """Open loop: one request every interval, whatever the latency of the previous ones."""
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(one(client, key, LIGHT_INPUT, max_new_tokens)))
        await asyncio.sleep(interval_s)
    return list(await asyncio.gather(*tasks))


async def flood(client, key: str, stop: asyncio.Event, concurrency: int, max_new_tokens: int,
                done: list[float]) -> None:
    """Closed loop: `concurrency` clients each sending the next long request as soon as one finishes."""
    async def worker() -> None:
        while not stop.is_set():
            latency = await one(client, key, HEAVY_INPUT, max_new_tokens)
            if latency is None:
                await asyncio.sleep(0.2)  # over its concurrency cap: keep the pressure on
            else:
                done.append(latency)
    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def phase(client, args, heavy_key: str, light_key: str, loaded: bool) -> tuple[list[float], int]:
    stop = asyncio.Event()
    heavy_done: list[float] = []
    flooder = None
    if loaded:
        flooder = asyncio.create_task(flood(client, heavy_key, stop, args.heavy_concurrency, args.heavy_tokens,
                                            heavy_done))
        await asyncio.sleep(args.warmup_s)  # let the flood fill the batch and the queue
    lat = await trickle(client, light_key, args.requests, args.interval_s, args.light_tokens)
    stop.set()
    if flooder is not None:
        await flooder
    return lat, len(heavy_done)


def report(name: str, lat: list[float]) -> str:
    return (f"{name:<34} n={len(lat):3d}  p50={pct(lat, 50):6.2f}s  p95={pct(lat, 95):6.2f}s  "
            f"max={max(lat):6.2f}s  mean={statistics.mean(lat):6.2f}s")


async def main_async(args) -> int:
    url, server = args.url, None
    if url is None:
        server, _ = start_server(args)
        url = server.url
    heavy_key, light_key = args.heavy_key or HEAVY_KEY, args.light_key or LIGHT_KEY
    capped_key = args.capped_key if args.url else CAPPED_KEY
    limits = httpx.Limits(max_connections=args.heavy_concurrency + args.requests + 8)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if (await client.get("/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log = "".join(server.log)[-3000:] if server else ""
                    raise SystemExit(f"the server at {url} did not become ready\n{log}")
                await asyncio.sleep(0.2)
            r = await client.post("/v1/tasks", headers={"Authorization": f"Bearer {heavy_key}"},
                                  json={"task_id": TASK, "kind": "hard", "template": "Q: {input}\nA:",
                                        "visibility": "public"})
            if r.status_code not in (201, 403):  # 403: the task exists already (an earlier run on --url)
                r.raise_for_status()
            await one(client, light_key, LIGHT_INPUT, args.light_tokens)  # warm-up
            print(f"server {url}; light: {args.requests} requests every {args.interval_s}s, {args.light_tokens} "
                  f"tokens; heavy: {args.heavy_concurrency} concurrent, {args.heavy_tokens} tokens each; "
                  f"batch {args.max_batch_size}")
            rows: list[tuple[str, list[float]]] = []
            idle, _ = await phase(client, args, heavy_key, light_key, loaded=False)
            print(report("light tenant, idle server", idle), flush=True)
            runs = [("flood, fair share only", heavy_key, light_key),
                    ("flood from a capped tenant", capped_key, light_key),
                    ("light sent as the flooder (FIFO)", heavy_key, heavy_key)]
            for name, flooder, light in runs:
                if flooder is None:
                    continue
                lat, heavy_n = await phase(client, args, flooder, light, loaded=True)
                rows.append((name, lat))
                print(report(name, lat), f" heavy finished {heavy_n}", flush=True)
    finally:
        if server is not None:
            server.close(grace_s=60)
    base = pct(idle, 95)
    print("\nlight tenant p95 relative to its idle p95 (goal <= 2x):")
    for name, lat in rows:
        ratio = pct(lat, 95) / base
        print(f"  {name:<34} {ratio:6.2f}x  {'met' if ratio <= 2 else 'NOT met'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="an existing server (default: start one)")
    p.add_argument("--heavy-key", help="API key of the heavy tenant on --url")
    p.add_argument("--light-key", help="API key of the light tenant on --url")
    p.add_argument("--capped-key", help="API key of a tenant on --url whose max_concurrent is below the batch size")
    p.add_argument("--reserve", type=int, default=2, help="rows the capped tenant leaves free (started server)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the started server (1 helps on a busy CPU)")
    p.add_argument("--device", help="device for the started server (default: cpu)")
    p.add_argument("--max-batch-size", type=int, default=8, help="batch size of the started server")
    p.add_argument("--requests", type=int, default=20, help="light requests per phase")
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between light requests")
    p.add_argument("--light-tokens", type=int, default=8)
    p.add_argument("--heavy-tokens", type=int, default=64)
    p.add_argument("--heavy-concurrency", type=int, default=32, help="heavy clients in flight (queued past the batch)")
    p.add_argument("--warmup-s", type=float, default=3.0, help="flood time before the light trickle starts")
    args = p.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
