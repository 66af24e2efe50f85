"""Async HTTP load generator for a running `python -m server` (issue 6): closed loop and open loop.

    .venv/bin/python -m server --store /tmp/bench-store &              # in another shell; wait for /ready
    .venv/bin/python -m scripts.bench_http                             # both modes, the standard workload
    .venv/bin/python -m scripts.bench_http --mode open --rate 2 --requests 64 --stream
    .venv/bin/python -m scripts.bench_http --quick --json /tmp/http.json

Setup: `--tasks` tasks cycling through hard, prompt tuning, P-tuning and prefix tuning are created once (skipped when
`<task-prefix><i>` already exists): hard prompts with a JSON body, soft prompts as multipart uploads of PEFT adapter
archives (random tensors on the model's scale, written by prompt_store.peft_io.export_peft). This needs the model
locally (to shape the tensors), loaded once before any timing.

Closed loop: `--concurrency` clients, each sending its next request when the previous one returns (throughput).
Open loop: requests arrive as a Poisson process at `--rate` requests/s whatever the server does (latency under a
given load; a server slower than the rate queues, and the latencies show it).

Requests go to POST /v1/tasks/{id}/generate (greedy, `max_new_tokens`); with `--stream` the SSE stream gives time to
first token and time per output token, else TTFT is not measured. `--classify N` adds N classify calls (short
inputs, 4 labels) after the generate runs. Tokens/s counts `usage.completion_tokens` (EOS can end a request early;
the server has no min_tokens). Reports requests/s, tokens/s, TTFT, TPOT, p50/p95/p99 latency, errors by status, and
the server's peak RSS when `--server-pid` is given (psutil). Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import httpx

from scripts.bench.inputs import CLASSIFY_LABELS, CLASSIFY_TEXTS, TEXTS
from scripts.common import command_line, load_avg, pct

# ------------------------------------------------------------------------------------------------------------ setup

def build_tasks(n: int, T: int, prefix: str, model: str) -> list[tuple[str, dict | None, bytes | None]]:
    """(task_id, hard JSON body or None, adapter zip or None) per task."""
    from prompt_core.fingerprint import fingerprint
    from prompt_core.model import load_model
    from prompt_core.spec import PromptKind, PromptTensors
    from prompt_store.peft_io import export_peft
    from scripts.bench.environment import warnings_off
    from scripts.bench.workload import make_tasks

    with warnings_off():
        loaded = load_model(None if model == "default" else model, "cpu", "float32")
    fp = fingerprint(loaded.model)
    tasks = make_tasks(loaded, n, T, seed=1)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, t in enumerate(tasks):
            tid = f"{prefix}{i}"
            spec = t.ref.spec
            if spec.kind is PromptKind.HARD:
                out.append((tid, {"task_id": tid, "kind": "hard", "template": spec.template,
                                  "task_type": "generate"}, None))
                continue
            d = Path(tmp) / tid
            export_peft(d, spec, PromptTensors(virtual=t.tensors.virtual, prefix=t.tensors.prefix), fp)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                for f in sorted(d.iterdir()):
                    zf.write(f, f.name)
            out.append((tid, None, buf.getvalue()))
    return out


async def ensure_tasks(client: httpx.AsyncClient, args) -> list[str]:
    ids = [f"{args.task_prefix}{i}" for i in range(args.tasks)]
    missing = [tid for tid in ids if (await client.get(f"/v1/tasks/{tid}")).status_code == 404]
    if missing:
        print(f"creating {len(missing)} tasks ({args.task_prefix}0..{args.tasks - 1})")
        built = {tid: (body, blob) for tid, body, blob in build_tasks(args.tasks, args.virtual_tokens,
                                                                      args.task_prefix, args.model)}
        for tid in missing:
            body, blob = built[tid]
            if body is not None:
                r = await client.post("/v1/tasks", json=body)
            else:
                meta = json.dumps({"task_type": "generate"})
                r = await client.post("/v1/tasks", data={"task_id": tid, "metadata": meta},
                                      files={"adapter": (f"{tid}.zip", blob, "application/zip")})
            if r.status_code != 201:
                raise SystemExit(f"creating {tid} failed: {r.status_code} {r.text[:300]}")
    else:
        print(f"tasks {args.task_prefix}0..{args.tasks - 1} exist; reusing them")
    return ids


async def ensure_classify_task(client: httpx.AsyncClient, args) -> str:
    tid = f"{args.task_prefix}cls"
    if (await client.get(f"/v1/tasks/{tid}")).status_code == 404:
        r = await client.post("/v1/tasks", json={"task_id": tid, "kind": "hard", "task_type": "classify",
                                                 "template": "Review: {input}\nSentiment:",
                                                 "labels": CLASSIFY_LABELS})
        if r.status_code != 201:
            raise SystemExit(f"creating {tid} failed: {r.status_code} {r.text[:300]}")
    return tid


# ------------------------------------------------------------------------------------------------------------ load

class Stats:
    def __init__(self, mode: str):
        self.mode = mode
        self.lat, self.ttft, self.tpot, self.tokens, self.ok = [], [], [], 0, 0
        self.errors: Counter = Counter()

    def summary(self, wall: float, sent: int, **extra) -> dict:
        return {"mode": self.mode, "requests": sent, "ok": self.ok, "errors": sum(self.errors.values()),
                "errors_by_status": dict(self.errors), "wall_s": wall, "req_per_s": self.ok / wall,
                "tok_per_s": self.tokens / wall, "tokens": self.tokens,
                "ttft_p50": pct(self.ttft, 50), "ttft_p95": pct(self.ttft, 95), "ttft_p99": pct(self.ttft, 99),
                "tpot_p50": pct(self.tpot, 50), "tpot_p95": pct(self.tpot, 95),
                "lat_p50": pct(self.lat, 50), "lat_p95": pct(self.lat, 95), "lat_p99": pct(self.lat, 99), **extra}


async def one_generate(client: httpx.AsyncClient, task: str, text: str, args, st: Stats) -> None:
    body = {"input": text, "max_new_tokens": args.new_tokens, "temperature": 0.0, "stream": args.stream}
    t0 = time.perf_counter()
    try:
        if not args.stream:
            r = await client.post(f"/v1/tasks/{task}/generate", json=body)
            if r.status_code != 200:
                st.errors[r.status_code] += 1
                return
            n = r.json()["usage"]["completion_tokens"]
            st.lat.append(time.perf_counter() - t0)
        else:
            first, n, done = None, 0, False
            async with client.stream("POST", f"/v1/tasks/{task}/generate", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    st.errors[r.status_code] += 1
                    return
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "token":
                        if first is None:
                            first = time.perf_counter() - t0
                    elif line.startswith("data: ") and event == "done":
                        n = json.loads(line[6:])["usage"]["completion_tokens"]
                        done = True
                    elif line.startswith("data: ") and event == "error":
                        st.errors["sse-error"] += 1
                        return
            if not done:
                st.errors["no-done"] += 1
                return
            total = time.perf_counter() - t0
            st.lat.append(total)
            if first is not None:
                st.ttft.append(first)
                if n > 1:
                    st.tpot.append((total - first) / (n - 1))
        st.tokens += n
        st.ok += 1
    except httpx.HTTPError as e:
        st.errors[type(e).__name__] += 1


def workload(ids: list[str], n: int, seed: int = 0):
    return [(ids[j % len(ids)], TEXTS[j % len(TEXTS)]) for j in range(n)]


async def closed_loop(client, ids, args) -> dict:
    st = Stats(f"closed c={args.concurrency}")
    todo = list(workload(ids, args.requests))
    todo.reverse()

    async def worker():
        while todo:
            task, text = todo.pop()
            await one_generate(client, task, text, args, st)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return st.summary(time.perf_counter() - t0, args.requests, concurrency=args.concurrency)


async def open_loop(client, ids, args) -> dict:
    st = Stats(f"open {args.rate}/s")
    rng = random.Random(0)
    t0 = time.perf_counter()
    pending = []
    at = 0.0
    for task, text in workload(ids, args.requests):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one_generate(client, task, text, args, st)))
        at += rng.expovariate(args.rate)
    send_s = time.perf_counter() - t0
    await asyncio.gather(*pending)
    return st.summary(time.perf_counter() - t0, args.requests, rate=args.rate, send_s=send_s)


async def classify_run(client, args) -> dict:
    tid = await ensure_classify_task(client, args)
    st = Stats("classify")
    sem = asyncio.Semaphore(args.concurrency)

    async def one(text):
        async with sem:
            t = time.perf_counter()
            try:
                r = await client.post(f"/v1/tasks/{tid}/classify", json={"input": text})
            except httpx.HTTPError as e:
                st.errors[type(e).__name__] += 1
                return
            if r.status_code != 200:
                st.errors[r.status_code] += 1
                return
            st.lat.append(time.perf_counter() - t)
            st.ok += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(CLASSIFY_TEXTS[i % len(CLASSIFY_TEXTS)]) for i in range(args.classify)))
    return st.summary(time.perf_counter() - t0, args.classify)


def server_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) the server process has used so far: steadier than wall time on a shared box."""
    if not pid:
        return None
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class ServerRSS:
    """Peak RSS of the server process (psutil), sampled every 50 ms while the load runs."""

    def __init__(self, pid: int | None):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        if self.pid:
            import psutil
            proc = psutil.Process(self.pid)

            def run():
                while not self._stop.is_set():
                    try:
                        rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                    except psutil.Error:
                        return
                    self.peak = max(self.peak, rss / 2**20)
                    self._stop.wait(0.05)
            self._t = threading.Thread(target=run, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


async def amain(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency, 256), max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        r = await client.get("/ready")
        if r.status_code != 200:
            raise SystemExit(f"{args.url}/ready answered {r.status_code}: {r.text[:200]}")
        ids = await ensure_tasks(client, args)
        # warm-up: one request per kind, not timed
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 2, "stream": False})
        await asyncio.gather(*(one_generate(client, tid, "Hi", warm, Stats("warm")) for tid in ids[:4]))
        runs = []
        modes = ["closed", "open"] if args.mode == "both" else [args.mode]
        with ServerRSS(args.server_pid) as mem:
            for m in modes + (["classify"] if args.classify else []):
                load = load_avg()
                cpu0 = server_cpu(args.server_pid)
                if m == "classify":
                    s = await classify_run(client, args)
                else:
                    s = await (closed_loop(client, ids, args) if m == "closed" else open_loop(client, ids, args))
                if cpu0 is not None:
                    s["server_cpu_s"] = server_cpu(args.server_pid) - cpu0
                    s["tok_per_server_cpu_s"] = s["tokens"] / s["server_cpu_s"] if s["server_cpu_s"] else None
                s["load"] = load
                runs.append(s)
                print_run(s)
        if args.server_pid:
            print(f"server peak RSS during the load: {mem.peak:.0f} MiB")
    return {"runs": runs, "server_peak_rss_mb": mem.peak if args.server_pid else None}


def ms(x):
    return "-" if x != x else f"{1000 * x:.0f}"


def print_run(s: dict) -> None:
    print(f"{s['mode']:<16} {s['ok']}/{s['requests']} ok in {s['wall_s']:.1f} s: {s['req_per_s']:.2f} req/s, "
          f"{s['tok_per_s']:.1f} tok/s | TTFT p50 {ms(s['ttft_p50'])} p95 {ms(s['ttft_p95'])} ms | TPOT p50 "
          f"{ms(s['tpot_p50'])} ms | latency p50 {ms(s['lat_p50'])} p95 {ms(s['lat_p95'])} p99 {ms(s['lat_p99'])} ms"
          f" | errors {s['errors_by_status'] or 0} | load {s['load']}"
          + (f" | server CPU {s['server_cpu_s']:.1f} s" if s.get("server_cpu_s") is not None else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("PROMPTSERVE_API_KEY"), help="Bearer key, if auth is on")
    p.add_argument("--mode", choices=["closed", "open", "both"], default="both")
    p.add_argument("--requests", type=int, default=64, help="requests per mode")
    p.add_argument("--concurrency", type=int, default=64, help="closed loop: clients in flight")
    p.add_argument("--rate", type=float, default=2.0, help="open loop: Poisson arrivals per second")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--stream", action="store_true", help="SSE: measure TTFT and TPOT")
    p.add_argument("--classify", type=int, default=0, help="also N classify calls (short inputs, 4 labels)")
    p.add_argument("--task-prefix", default="bench-")
    p.add_argument("--model", default="default", help="the server's model (to shape the adapters)")
    p.add_argument("--server-pid", type=int, help="report the server's peak RSS (psutil)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--quick", action="store_true", help="16 requests, 8 tasks, 16 tokens, rate 1/s")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.tasks, args.new_tokens, args.rate = 16, 8, 16, 1.0
        args.concurrency = min(args.concurrency, 16)
    import datetime as dt
    print(f"# bench_http {args.url}: {args.requests} requests/mode over {args.tasks} tasks, {args.new_tokens} new "
          f"tokens, stream={args.stream}, load {load_avg()}")
    res = asyncio.run(amain(args))
    res.update({"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": command_line(), "load": load_avg(), "config": {k: str(v) for k, v in vars(args).items()
                                                                           if k != "api_key"}})
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
