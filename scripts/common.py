"""What the scripts share: one percentile definition, so every report's p50/p95/p99 is the same statistic, and a
free loopback port."""

from __future__ import annotations

import socket


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (q in 0..100), linear between the two nearest ranks; nan for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
