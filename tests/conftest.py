"""Test-wide settings, read before anything imports torch."""

import os

# The suite runs on shared 2-core machines: OpenMP threads that spin while they wait for each other run 10-20x slower
# when another process holds a core (a 576x1536 bf16 linear: 2.1 ms with two spinning threads, 0.12 ms with passive
# waits, measured under load). Waiting passively changes no result, only how idle threads wait.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
