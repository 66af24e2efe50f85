"""Soak test: many concurrent clients on mixed tasks and endpoints against a loopback promptserve, with memory watch.

    python -m scripts.soak                          # 200 clients, 5 minutes, starts `python -m server` itself
    python -m scripts.soak --duration 60 --clients 50
    python -m scripts.soak --url http://127.0.0.1:8000 --key KEY --pid 1234   # a running server (loopback only)

It creates a hard generate task, a hard classify task, a prompt-tuning task and a prefix-tuning task (both with
labels), then runs N asyncio clients (httpx), spread over four tenants, each looping over a random mix of: native
generate (JSON and SSE), native classify (one input and a list), /v1/completions and /v1/chat/completions, with small
max_new_tokens. 429 and 503 are the documented backpressure answers: the client waits Retry-After (capped) and goes on.

Every 200 is checked for completeness (generate: finish_reason, usage within max_new_tokens, SSE ends with `done`
whose text equals the concatenated token texts; classify: one result per input, scores sum to 1; OpenAI: one choice
per prompt with a finish_reason). Prints completed requests, errors by status, incomplete responses, latency
percentiles per endpoint, the server's resident memory over time (psutil on its pid), memory growth after warm-up,
and the load average. `--json PATH` writes the same figures as JSON.
Exit status 1 if a goal is missed: an error other than 429/503, an incomplete response, or growth >= 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

from scripts.common import ServerProcess, artifact_zip, pct, write_auth_file

TENANTS = ["t0", "t1", "t2", "t3"]
KEYS = {t: f"soak-{t}-key-0123456789abcdef" for t in TENANTS}
LABELS = ["yes", "no"]
TEXTS = ["I loved it", "What is the capital of France?", "1, 2, 3, 4,", "The weather today is", "Summarize: cats",
         "ok", "Ça va très bien, merci", "数字は", "Review: terrible service, never again"]


# ---- server and tasks

def soft_zip(kind: str, T: int, seed: int) -> bytes:
    import torch

    from prompt_core.spec import PromptTensors
    from prompt_store.format import TaskManifest

    g = torch.Generator().manual_seed(seed)
    if kind == "prefix_tuning":
        tensors = PromptTensors(prefix=torch.randn(30, 2, 3, T, 64, generator=g) * 0.05)
    else:
        tensors = PromptTensors(virtual=torch.randn(T, 576, generator=g) * 0.05)
    labels = [{"name": n, "verbalizer": f" {n}"} for n in LABELS]
    manifest = TaskManifest(id="artifact", version=1, tenant="", visibility="private", kind=kind,
                            num_virtual_tokens=T, template="{input}", labels=labels, task_type="classify")
    return artifact_zip(manifest, tensors)


def setup_tasks(url: str) -> None:
    owner = KEYS["t0"]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {owner}"}, timeout=120) as c:
        for body in ({"task_id": "soak-qa", "kind": "hard", "template": "Q: {input}\nA:", "visibility": "public"},
                     {"task_id": "soak-cls", "kind": "hard", "template": "Review: {input}\nSentiment:",
                      "labels": LABELS, "visibility": "public"}):
            r = c.post("/v1/tasks", json=body)
            assert r.status_code == 201, r.text
        for task, kind, T in (("soak-pt", "prompt_tuning", 8), ("soak-prefix", "prefix_tuning", 4)):
            r = c.post("/v1/tasks", data={"task_id": task, "metadata": json.dumps({"visibility": "public"})},
                       files={"adapter": ("a.zip", soft_zip(kind, T, seed=len(task)), "application/zip")})
            assert r.status_code == 201, r.text


# ---- the clients

GEN_TASKS = ["soak-qa", "soak-pt", "soak-prefix"]
CLS_TASKS = ["soak-cls", "soak-pt", "soak-prefix"]


class Stats:
    def __init__(self):
        self.by_status: collections.Counter = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.incomplete: list[str] = []
        self.unexpected: list[str] = []
        self.transport: collections.Counter = collections.Counter()
        self.completed = 0
        self.tokens = 0


def _check(kind: str, body, req: dict) -> str | None:
    """None if the 200 answer is complete; else what is missing."""
    if kind == "generate":
        if body.get("finish_reason") not in ("stop", "length") or not isinstance(body.get("text"), str):
            return f"generate: bad finish/text {body}"
        if not 0 <= body["usage"]["completion_tokens"] <= req["max_new_tokens"]:
            return f"generate: {body['usage']} over {req['max_new_tokens']}"
        if body["finish_reason"] == "length" and body["usage"]["completion_tokens"] != req["max_new_tokens"]:
            return f"generate: length with {body['usage']}"
    elif kind == "classify":
        results = body if isinstance(req["input"], list) else [body]
        n = len(req["input"]) if isinstance(req["input"], list) else 1
        if len(results) != n:
            return f"classify: {len(results)} results for {n} inputs"
        for res in results:
            if set(res["scores"]) != set(LABELS) or abs(sum(res["scores"].values()) - 1) > 1e-3 or \
                    res["label"] != max(res["scores"], key=res["scores"].get):
                return f"classify: bad result {res}"
    elif kind == "completions":
        n = len(req["prompt"]) if isinstance(req["prompt"], list) else 1
        if len(body["choices"]) != n or any(ch["finish_reason"] not in ("stop", "length") for ch in body["choices"]):
            return f"completions: {body['choices']}"
        if sorted(ch["index"] for ch in body["choices"]) != list(range(n)):
            return "completions: indexes"
    elif kind == "chat":
        ch = body["choices"]
        if len(ch) != 1 or ch[0]["finish_reason"] not in ("stop", "length") or ch[0]["message"]["role"] != "assistant":
            return f"chat: {ch}"
    return None


async def one_request(c: httpx.AsyncClient, rng: random.Random, stats: Stats) -> float:
    """Run one random request; returns how long to wait before the next (Retry-After on 429/503)."""
    kind = rng.choices(["generate", "generate_sse", "classify", "completions", "chat"], [3, 2, 3, 1, 1])[0]
    n = rng.randint(2, 12)
    if kind in ("generate", "generate_sse"):
        req = {"input": rng.choice(TEXTS), "max_new_tokens": n, "stream": kind == "generate_sse"}
        if rng.random() < 0.3:
            req.update(temperature=0.8, seed=rng.randrange(1 << 30))
        path = f"/v1/tasks/{rng.choice(GEN_TASKS)}/generate"
    elif kind == "classify":
        req = {"input": rng.choice(TEXTS) if rng.random() < 0.7 else rng.sample(TEXTS, rng.randint(2, 4))}
        path = f"/v1/tasks/{rng.choice(CLS_TASKS)}/classify"
    elif kind == "completions":
        req = {"model": rng.choice(GEN_TASKS), "prompt": rng.choice(TEXTS) if rng.random() < 0.7 else
               rng.sample(TEXTS, 2), "max_tokens": n, "temperature": 0}
        path = "/v1/completions"
    else:
        req = {"model": rng.choice(GEN_TASKS), "max_tokens": n, "temperature": 0,
               "messages": [{"role": "user", "content": rng.choice(TEXTS)}]}
        path = "/v1/chat/completions"
    t0 = time.perf_counter()
    try:
        if kind == "generate_sse":
            status, problem = await _sse(c, path, req)
        else:
            r = await c.post(path, json=req)
            status, problem = r.status_code, None
            if status == 200:
                problem = _check("generate" if kind == "generate" else kind, r.json(), req)
                if kind in ("generate",):
                    stats.tokens += r.json()["usage"]["completion_tokens"]
            elif status in (429, 503):
                stats.by_status[status] += 1
                return min(float(r.headers.get("Retry-After", "1")), 5.0)
            elif len(stats.unexpected) < 20:
                stats.unexpected.append(f"{path} {status} {r.text[:300]}")
    except (httpx.TransportError, json.JSONDecodeError, KeyError, TypeError) as e:
        stats.transport[type(e).__name__] += 1
        if len(stats.unexpected) < 20:
            stats.unexpected.append(f"{path} {type(e).__name__}: {e}")
        return 1.0
    stats.by_status[status] += 1
    if status == 200:
        stats.latency[kind].append(time.perf_counter() - t0)
        stats.completed += 1
        if problem:
            stats.incomplete.append(problem)
    elif status in (429, 503):
        return 1.0
    return 0.0


async def _sse(c: httpx.AsyncClient, path: str, req: dict) -> tuple[int, str | None]:
    async with c.stream("POST", path, json=req) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        event, texts, done = None, [], None
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "token":
                    texts.append(data["text"])
                elif event == "done":
                    done = data
                elif event == "error":
                    return 200, f"sse error event {data}"
        if done is None:
            return 200, "sse: no done event"
        if "".join(texts) != done["text"]:
            return 200, "sse: token texts != done text"
        return 200, _check("generate", done, req)


async def client_loop(i: int, url: str, stop_at: float, stats: Stats, limits: httpx.Limits) -> None:
    rng = random.Random(i)
    tenant = TENANTS[i % len(TENANTS)]
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=600,
                                 limits=limits) as c:
        while time.monotonic() < stop_at:
            wait = await one_request(c, rng, stats)
            if wait:
                await asyncio.sleep(wait)


# ---- memory watch

def sampler(pid: int, samples: list, stop: threading.Event, every_s: float, t0: float) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            return
        samples.append((time.monotonic() - t0, rss, os.getloadavg()[0]))
        stop.wait(every_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=300, help="seconds of load (default 300 = 5 minutes)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the memory baseline "
                                                               "(default: 20%% of the duration, at most 60)")
    ap.add_argument("--url", help="a running server on loopback (then pass --pid and a key per tenant via "
                                  "--key for t0..t3 is not supported: use the built-in server)")
    ap.add_argument("--pid", type=int, help="server pid for --url")
    ap.add_argument("--server-args", default="", help="extra flags for the started server")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, 0.2 * args.duration)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server we started

    tmp = tempfile.TemporaryDirectory(prefix="soak-")
    server = None
    try:
        if args.url:
            host = urlparse(args.url).hostname or ""
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise SystemExit("soak runs against loopback only")
            url, pid = args.url.rstrip("/"), args.pid
        else:
            auth = write_auth_file(Path(tmp.name) / "auth.json", {k: t for t, k in KEYS.items()})
            server = ServerProcess(Path(tmp.name) / "store", "--auth-file", str(auth), *args.server_args.split(),
                                   start_timeout_s=300)
            url, pid = server.url, server.pid
        setup_tasks(url)
        load0 = os.getloadavg()
        print(f"soak: {args.clients} clients for {args.duration:.0f} s against {url} (pid {pid}); "
              f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; {os.cpu_count()} CPUs", flush=True)
        stats = Stats()
        samples: list = []
        stop = threading.Event()
        t0 = time.monotonic()
        if pid:
            threading.Thread(target=sampler, args=(pid, samples, stop, 5.0, t0), daemon=True).start()

        async def run():
            limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
            stop_at = time.monotonic() + args.duration
            reporter = asyncio.ensure_future(progress(stats, samples, t0))
            await asyncio.wait_for(asyncio.gather(*(client_loop(i, url, stop_at, stats, limits)
                                                    for i in range(args.clients))), args.duration + 600)
            reporter.cancel()

        asyncio.run(run())
        wall = time.monotonic() - t0
        stop.set()
        load1 = os.getloadavg()
        return report(args, stats, samples, wall, warmup, load0, load1, server)
    finally:
        if server is not None:
            server.close(grace_s=60)
        tmp.cleanup()


async def progress(stats: Stats, samples: list, t0: float) -> None:
    while True:
        await asyncio.sleep(30)
        rss = samples[-1][1] / 2**20 if samples else float("nan")
        print(f"  t={time.monotonic() - t0:5.0f} s  completed={stats.completed}  statuses={dict(stats.by_status)}  "
              f"rss={rss:.0f} MiB  load1={os.getloadavg()[0]:.2f}", flush=True)


def report(args, stats: Stats, samples: list, wall: float, warmup: float, load0, load1, server) -> int:
    out: dict = {"clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
                 "completed": stats.completed, "by_status": dict(stats.by_status),
                 "transport_errors": dict(stats.transport), "incomplete": len(stats.incomplete),
                 "throughput_rps": round(stats.completed / wall, 2), "load_avg_start": load0, "load_avg_end": load1,
                 "cpus": os.cpu_count(), "latency_s": {}}
    print(f"\ncompleted requests: {stats.completed} in {wall:.0f} s ({stats.completed / wall:.1f}/s)")
    print("statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(stats.by_status.items())))
    print(f"transport errors: {dict(stats.transport) or 0}; incomplete 200s: {len(stats.incomplete)}")
    for line in stats.unexpected[:10]:
        print(f"  unexpected: {line}")
    for line in stats.incomplete[:10]:
        print(f"  incomplete: {line}")
    print(f"{'endpoint':<14} {'n':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  (seconds)")
    all_lat = [x for xs in stats.latency.values() for x in xs]
    for kind, xs in sorted(stats.latency.items()) + [("all", all_lat)]:
        row = {q: round(pct(xs, q), 3) for q in (50, 90, 99, 100)}
        out["latency_s"][kind] = {"n": len(xs), **{f"p{q}": v for q, v in row.items()}}
        print(f"{kind:<14} {len(xs):>6} {row[50]:>7.2f} {row[90]:>7.2f} {row[99]:>7.2f} {row[100]:>7.2f}")
    growth = None
    if samples:
        print("resident memory of the server (MiB) over time:")
        for t, rss, la in samples[::max(1, len(samples) // 20)]:
            print(f"  t={t:5.0f} s  rss={rss / 2**20:7.1f}  load1={la:.2f}")
        base = [rss for t, rss, _ in samples if warmup - 10 <= t <= warmup + 10] or [samples[0][1]]
        end = [rss for t, rss, _ in samples if t >= samples[-1][0] - 30]
        base_rss, end_rss = statistics.median(base), statistics.median(end)
        growth = (end_rss - base_rss) / base_rss * 100
        out.update(rss_mib=[(round(t, 1), round(rss / 2**20, 1)) for t, rss, _ in samples],
                   rss_after_warmup_mib=round(base_rss / 2**20, 1), rss_end_mib=round(end_rss / 2**20, 1),
                   rss_peak_mib=round(max(r for _, r, _ in samples) / 2**20, 1),
                   memory_growth_after_warmup_pct=round(growth, 2), warmup_s=warmup)
        print(f"memory after warm-up ({warmup:.0f} s): {base_rss / 2**20:.1f} MiB; at the end: {end_rss / 2**20:.1f} "
              f"MiB; growth {growth:+.2f}%; peak {max(r for _, r, _ in samples) / 2**20:.1f} MiB")
    print(f"load average: start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; end {load1[0]:.2f} {load1[1]:.2f} "
          f"{load1[2]:.2f} on {os.cpu_count()} CPUs")
    if server is not None and server.errors:
        print("server log ERROR/Traceback lines:\n" + "".join(server.errors[:10]))
        out["server_errors"] = server.errors[:10]
    bad_status = {s: n for s, n in stats.by_status.items() if s not in (200, 429, 503)}
    ok = not bad_status and not stats.transport and not stats.incomplete and (growth is None or growth < 5)
    out["goals_met"] = ok
    print("goals met" if ok else f"GOALS MISSED: statuses {bad_status}, transport {dict(stats.transport)}, "
                                 f"incomplete {len(stats.incomplete)}, growth {growth}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
