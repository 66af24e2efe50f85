"""Shared helpers for the deployment checks: repository paths and a small Dockerfile parser."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The metric families of the server contract (issue 4) with their Prometheus types.
METRICS = {
    "promptserve_requests_total": "counter",
    "promptserve_request_duration_seconds": "histogram",
    "promptserve_queue_wait_seconds": "histogram",
    "promptserve_time_to_first_token_seconds": "histogram",
    "promptserve_time_per_output_token_seconds": "histogram",
    "promptserve_prompt_tokens_total": "counter",
    "promptserve_generated_tokens_total": "counter",
    "promptserve_batch_size": "histogram",
    "promptserve_running_requests": "gauge",
    "promptserve_waiting_requests": "gauge",
    "promptserve_prompt_cache_hits_total": "counter",
    "promptserve_prompt_cache_misses_total": "counter",
    "promptserve_prompt_cache_evictions_total": "counter",
    "promptserve_prompt_cache_resident_bytes": "gauge",
    "promptserve_tenant_requests_total": "counter",
    "promptserve_tenant_tokens_total": "counter",
    # batches (issue 25)
    "promptserve_batches": "gauge",
    "promptserve_batch_requests_total": "counter",
    "promptserve_batch_tokens_total": "counter",
    "promptserve_background_steps_abandoned_total": "counter",
}
METRIC_LABELS = {
    "promptserve_requests_total": {"endpoint", "status"},
    "promptserve_request_duration_seconds": {"endpoint"},
    "promptserve_prompt_cache_hits_total": {"tier"},
    "promptserve_prompt_cache_misses_total": {"tier"},
    "promptserve_prompt_cache_evictions_total": {"tier"},
    "promptserve_prompt_cache_resident_bytes": {"tier"},
    "promptserve_tenant_requests_total": {"tenant"},
    "promptserve_tenant_tokens_total": {"tenant", "direction"},
    "promptserve_batches": {"status"},
    "promptserve_batch_requests_total": {"outcome"},
}
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def metric_family(series: str) -> str:
    """Map a series name used in PromQL to its family, refusing suffixes that its type does not export."""
    if series in METRICS:
        if METRICS[series] == "histogram":
            raise AssertionError(f"{series} is a histogram: query {series}_bucket, _sum or _count")
        return series
    for suffix in _HISTOGRAM_SERIES:
        base = series[: -len(suffix)]
        if series.endswith(suffix) and METRICS.get(base) == "histogram":
            return base
    raise AssertionError(f"{series} is not a promptserve metric of the server contract")


def promql_series(expr: str) -> list[str]:
    return re.findall(r"\bpromptserve_[a-z0-9_]+", expr)


@dataclass
class Instruction:
    line: int
    keyword: str
    value: str


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for this repository's Dockerfile)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, value = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), value.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


def run_shell_command(inst: Instruction) -> str:
    """The shell part of a RUN instruction, without its --mount/--network flags."""
    assert inst.keyword == "RUN"
    rest = inst.value
    while rest.startswith("--"):
        _, _, rest = rest.partition(" ")
        rest = rest.lstrip()
    return rest


def dockerfile_env(insts: list[Instruction], upto: int | None = None) -> dict[str, str]:
    """ENV values in effect (ARG defaults included, as a RUN sees them) before instruction index `upto`."""
    env: dict[str, str] = {}
    for inst in insts[:upto]:
        if inst.keyword in ("ENV", "ARG"):
            for token in shlex.split(inst.value):
                if "=" in token:
                    key, _, val = token.partition("=")
                    env[key] = val
    return env
