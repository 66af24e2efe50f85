"""When a batch line may start: from idle capacity, and within `--batch-share` while interactive traffic is present.

Interactive work is what the engine runs for network requests; batch work is what batch lines submit (both counted
by `server.api.serving.EngineCall` in `Runtime.work`). The rule, checked before every line starts:

- no interactive request in flight for `quiet_s` (1 s): batch lines run up to `--batch-max-in-flight` (the runner's
  own bound). (Without the quiet second, lines started in each short gap of a steady light load were preempted by
  the next request, and each cost that request a batch step of waiting.)
- interactive requests in flight and some engine request waiting for a row: no new batch line;
- interactive requests in flight, nothing waiting: batch engine requests stay below `--batch-share` of
  `--max-batch-size` rows (0: none while interactive traffic is present);
- and batch lines running beyond that share when interactive traffic arrives are preempted (`excess`): the runner
  cancels its newest lines (their rows are freed at the engine's next step, as for a client that left) and runs
  them again later. Only the runner's calls into the app do this; the engine's scheduler (EngineRequest.priority)
  is where batch rows will also give way inside a step (admitted after, preempted before interactive ones).
"""

from __future__ import annotations

import math
import time


class Gate:
    """The default: always open (a worker without interactive traffic runs at full capacity)."""

    def open(self) -> bool:
        return True

    def excess(self) -> int:
        """Batch engine requests to preempt now (0: none)."""
        return 0


class IdleCapacity(Gate):
    def __init__(self, work, engine, share: float, max_batch_size: int, quiet_s: float = 1.0):
        self.work, self.engine, self.share, self.quiet_s = work, engine, share, quiet_s
        self.rows = math.floor(share * max_batch_size)
        self.held = 0                     # times a line was held back (for tests and debugging)

    def open(self) -> bool:
        if self.work.interactive <= 0 and time.monotonic() - self.work.interactive_at >= self.quiet_s:
            return True
        engine = self.engine() if callable(self.engine) else self.engine
        try:
            waiting = engine.stats().waiting if engine is not None else 0
        except RuntimeError:  # the engine thread changed its queues while we counted: ask again next time
            waiting = 1
        if waiting == 0 and self.work.batch < self.rows:
            return True
        self.held += 1
        return False

    def excess(self) -> int:
        if self.work.interactive <= 0:
            return 0
        return max(0, self.work.batch - self.rows)
