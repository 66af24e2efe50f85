"""Admission under a burst, on the default settings: one tenant's 100 concurrent requests queue instead of getting
429 at its guaranteed share, and a second tenant that arrives behind the burst is still served its fair share (the
engine's virtual token counters admit it ahead of the queued burst)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.api.conftest import ACME, GLOBEX, hard_task, live_server


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp) as s:   # --max-concurrent 64 and --max-queue 1024: the defaults
        with s.client(ACME) as c:
            assert hard_task(c, "qa").status_code == 201
        with s.client(GLOBEX) as c:
            assert hard_task(c, "qa").status_code == 201
        yield s


def generate(client, text: str, tokens: int = 8):
    r = client.post("/v1/tasks/qa/generate", json={"input": text, "max_new_tokens": tokens, "ignore_eos": True})
    return r.status_code, time.monotonic()


def test_a_burst_of_100_from_one_tenant_queues_instead_of_429(server):
    assert server.runtime.settings.max_concurrent == 64 and server.runtime.settings.max_queue == 1024
    with server.client(ACME, timeout=600) as acme, ThreadPoolExecutor(100) as pool:
        codes = [f.result()[0] for f in [pool.submit(generate, acme, f"burst {i}") for i in range(100)]]
    assert codes == [200] * 100
    assert server.runtime.limiter.in_flight("acme") == 0


def test_a_second_tenant_keeps_its_share_behind_a_burst(server):
    with server.client(ACME, timeout=600) as acme, server.client(GLOBEX, timeout=600) as globex, \
            ThreadPoolExecutor(110) as pool:
        burst = [pool.submit(generate, acme, f"heavy {i}", 48) for i in range(100)]
        while server.runtime.engine.stats().running < 64:       # the burst fills every row, the rest queues
            time.sleep(0.05)
        light = [pool.submit(generate, globex, f"light {i}", 8) for i in range(5)]
        light_done = [f.result() for f in light]
        heavy = [f.result() for f in burst]
    assert all(code == 200 for code, _ in light_done + heavy)
    # served by its share at once (rows taken from the tenant over its share), not after the burst's first rows end
    assert max(t for _, t in light_done) < min(t for _, t in heavy)
