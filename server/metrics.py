"""Prometheus metrics: one registry per app, the engine observer, and a collector for the store's cache tiers.

Labels stay bounded: `endpoint` is the route template (never the raw path), `tenant` comes from the auth file, and
no metric is labelled by task, since tasks are unbounded (10,000+).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.auth import BATCH_CALLER

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# The store reports, per tier ("disk", "host", "device"), counters and resident bytes under these keys.
TierStats = Mapping[str, Mapping[str, float]]


class PromptCacheCollector(Collector):
    """Reads the store's tier counters at scrape time, so the store needs no prometheus dependency."""

    def __init__(self, stats: Callable[[], TierStats]):
        self._stats = stats

    def describe(self) -> Iterable:  # no describe-time scrape: the store may not be open yet
        return []

    def collect(self) -> Iterable:
        fams = {name: CounterMetricFamily(f"promptserve_prompt_cache_{name}", f"prompt-cache {name} per tier",
                                          labels=["tier"]) for name in ("hits", "misses", "evictions")}
        resident = GaugeMetricFamily("promptserve_prompt_cache_resident_bytes", "bytes of prompts resident per tier",
                                     labels=["tier"])
        try:
            stats = self._stats() or {}
        except Exception:  # noqa: BLE001 - a scrape must never fail because the store is busy or closing
            stats = {}
        for tier, s in sorted(stats.items()):
            for name, fam in fams.items():
                fam.add_metric([tier], float(s.get(name, 0)))
            resident.add_metric([tier], float(s.get("resident_bytes", 0)))
        yield from fams.values()
        yield resident


class KVCacheCollector(Collector):
    """The paged key/value cache (vLLM's meanings): capacity, bytes held by running sequences, bytes held by more
    than one sequence at once, and the prefix cache's queried and served prompt tokens."""

    def __init__(self, stats: Callable[[], Mapping[str, int]]):
        self._stats = stats

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        try:
            s = self._stats()
        except Exception:  # noqa: BLE001 - a scrape must never fail while the engine changes its tables
            return
        for name, help_, key in (("capacity", "bytes of the key/value cache, allocated at start", "capacity_bytes"),
                                 ("used", "bytes of key/value blocks held by running sequences", "used_bytes"),
                                 ("shared", "bytes of key/value blocks held by several sequences at once (a task's "
                                            "head, a repeated prompt): each held once", "shared_bytes")):
            yield GaugeMetricFamily(f"promptserve_kv_cache_{name}_bytes", help_, value=float(s[key]))
        yield CounterMetricFamily("promptserve_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                  value=float(s["prefix_queries"]))
        yield CounterMetricFamily("promptserve_prefix_cache_hits", "prompt tokens served from the prefix cache",
                                  value=float(s["prefix_hits"]))


BATCH_STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                  "cancelled")


class BatchCollector(Collector):
    """Batches on the shared store by status, read at scrape time (every status is always exported)."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]):
        self._counts = counts

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        fam = GaugeMetricFamily("promptserve_batches", "batches on the store by status", labels=["status"])
        try:
            counts = self._counts() or {}
        except Exception:  # noqa: BLE001 - a scrape must never fail because the store is busy or closing
            counts = {}
        for status in BATCH_STATUSES:
            fam.add_metric([status], float(counts.get(status, 0)))
        yield fam


class Metrics:
    """Every metric family of the server, registered in its own registry (several apps may live in one process)."""

    def __init__(self, tier_stats: Callable[[], TierStats] | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("promptserve_requests_total", "HTTP requests by route and status",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("promptserve_request_duration_seconds",
                                          "HTTP request duration, streams until their last byte", ["endpoint"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("promptserve_queue_wait_seconds", "time from arrival to first schedule",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("promptserve_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("promptserve_time_per_output_token_seconds", "decode time per token after the first",
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("promptserve_prompt_tokens", "input tokens (virtual tokens included)",
                                     registry=r)
        self.generated_tokens = Counter("promptserve_generated_tokens", "generated tokens", registry=r)
        self.batch_size = Histogram("promptserve_batch_size", "rows per engine step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.model_info = Gauge("promptserve_model_info", "1, labelled with the served base model, device, dtype, "
                                "quantization and whether requests are batch-invariant",
                                ["base_model", "device", "dtype", "quantization", "batch_invariant"], registry=r)
        self.decode_compile_seconds = Gauge("promptserve_decode_compile_seconds", "time --compile spent compiling "
                                            "the decode step at start-up (0: eager)", registry=r)
        self.decode_eager_steps = Gauge("promptserve_decode_eager_steps", "decode steps after start-up that no "
                                        "compiled graph covered, so they ran eagerly (with --compile)", registry=r)
        self.running = Gauge("promptserve_running_requests", "requests in the running batch", registry=r)
        self.waiting = Gauge("promptserve_waiting_requests", "requests waiting for a batch slot", registry=r)
        self.tenant_requests = Counter("promptserve_tenant_requests", "engine requests finished per tenant",
                                       ["tenant"], registry=r)
        self.tenant_tokens = Counter("promptserve_tenant_tokens", "tokens per tenant, in (prompt) and out",
                                     ["tenant", "direction"], registry=r)
        self.finished = Counter("promptserve_engine_requests", "engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.constrained = Counter("promptserve_constrained_requests", "generate requests with an output constraint",
                                   ["kind"], registry=r)
        self.grammar_compile = Histogram("promptserve_grammar_compile_seconds",
                                         "compiling one output constraint (cached afterwards)", ["kind"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.grammar_mask = Histogram("promptserve_grammar_mask_seconds",
                                      "grammar token masks of one batched step (all constrained rows)",
                                      buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025) + LATENCY_BUCKETS, registry=r)
        self.preemptions = Counter("promptserve_preemptions", "sequences preempted (recomputed later) by reason: "
                                   "memory (no free key/value block), fairness (a starved tenant), priority (an "
                                   "interactive request over batch work)", ["reason"], registry=r)
        self.abandoned = Counter("promptserve_background_steps_abandoned", "steps of batch rows alone stopped "
                                 "between two layers because interactive work arrived (their rows run again)",
                                 registry=r)
        # batches (server/batches): lines are counted as they finish, tokens as their engine requests end
        self.batch_requests = Counter("promptserve_batch_requests", "batch lines by outcome: completed (2xx, output "
                                      "file), failed (error file)", ["outcome"], registry=r)
        self.batch_tokens = Counter("promptserve_batch_tokens", "prompt + generated tokens of batch lines",
                                    registry=r)
        for outcome in ("completed", "failed"):
            self.batch_requests.labels(outcome)
        self.batch_counts: Callable[[], Mapping[str, int]] = dict  # status -> batches; set once the store opens
        r.register(BatchCollector(lambda: self.batch_counts()))
        if tier_stats is not None:
            r.register(PromptCacheCollector(tier_stats))

    def watch_engine(self, engine) -> None:
        """Read the engine's key/value cache numbers at scrape time."""
        self.registry.register(KVCacheCollector(engine.kv_stats))

    # -- EngineObserver (called from the engine thread; prometheus-client is thread-safe) --

    def step_done(self, batch_size: int, running: int, waiting: int) -> None:
        if batch_size:
            self.batch_size.observe(batch_size)
        self.running.set(running)
        self.waiting.set(waiting)

    def request_finished(self, out, tenant: str, task_key: str) -> None:  # task is never a label
        self.finished.labels(out.finish_reason or "unknown").inc()
        self.tenant_requests.labels(tenant).inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generated_tokens.inc(out.completion_tokens)
        self.tenant_tokens.labels(tenant, "in").inc(out.prompt_tokens)
        self.tenant_tokens.labels(tenant, "out").inc(out.completion_tokens)
        if out.queue_wait_s is not None:
            self.queue_wait.observe(out.queue_wait_s)
        if out.ttft_s is not None:
            self.ttft.observe(out.ttft_s)

    def preempted(self, reason: str) -> None:
        self.preemptions.labels(reason).inc()

    def step_abandoned(self) -> None:
        self.abandoned.inc()

    def constrained_request(self, kind: str) -> None:
        self.constrained.labels(kind).inc()

    def grammar_compiled(self, kind: str, seconds: float) -> None:
        self.grammar_compile.labels(kind).observe(seconds)

    def grammar_masked(self, seconds: float, rows: int) -> None:  # rows: the batch-size histogram
        self.grammar_mask.observe(seconds)

    def observe_tpot(self, out, duration_s: float) -> None:
        """Decode time per token after the first; the API measures the duration from its submit to the end."""
        if out.ttft_s is not None and out.completion_tokens > 1 and out.finish_reason in ("stop", "length"):
            self.tpot.observe(max(0.0, duration_s - out.ttft_s) / (out.completion_tokens - 1))

    # -- HTTP --

    def observe_http(self, endpoint: str, status: int, started: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_duration.labels(endpoint).observe(time.perf_counter() - started)


class HttpMetricsMiddleware:
    """Counts each request once its response is complete (the last chunk of a stream), labelled by route template."""

    def __init__(self, app, metrics_of: Callable[[], Metrics | None]):
        self.app = app
        self.metrics_of = metrics_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        done = False

        async def wrapped_send(message):
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
                self._observe(scope, status, started)

        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            if not done:  # the client went away mid-stream, or the app failed before answering
                self._observe(scope, status if status != 200 else 499, started)

    def _observe(self, scope, status: int, started: float) -> None:
        metrics = self.metrics_of()
        if metrics is None:
            return
        if scope.get(BATCH_CALLER) is not None:  # a batch's line, run in-process: not HTTP traffic
            return
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        metrics.observe_http(endpoint, status, started)
