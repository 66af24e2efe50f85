"""Fine-tuning inside the server (server/training_service.py): the gate that keeps serving first."""

from __future__ import annotations

import threading
import time

from server.training_service import ServingGate


class _Engine:
    ready = True

    def __init__(self):
        self.in_flight = 0


def test_gate_trains_when_idle_and_within_its_share_when_busy():
    engine, stop = _Engine(), threading.Event()
    gate = ServingGate(engine, share=0.0, window_s=0.5, poll_s=0.001)
    t0 = time.monotonic()
    gate.wait(stop)                       # idle: no wait
    assert time.monotonic() - t0 < 0.05
    engine.in_flight = 1                  # busy, share 0: waits for the engine to be idle
    threading.Timer(0.3, lambda: setattr(engine, "in_flight", 0)).start()
    t0 = time.monotonic()
    gate.wait(stop)
    assert time.monotonic() - t0 >= 0.25

    gate = ServingGate(engine, share=0.5, window_s=0.5, poll_s=0.001)
    engine.in_flight = 1                  # busy, share 0.5 of 0.5 s: steps run until they used 0.25 s of the window
    gate.wait(stop)
    gate.done(0.3)
    t0 = time.monotonic()
    gate.wait(stop)                       # over its share: waits until the step leaves the window
    assert 0.3 <= time.monotonic() - t0 < 1.0
    stop.set()
    gate.done(10.0)
    t0 = time.monotonic()
    gate.wait(stop)                       # stopping never blocks
    assert time.monotonic() - t0 < 0.05
