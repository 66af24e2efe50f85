"""When a batch line may start: from idle capacity, and within `--batch-share` while interactive traffic is present.

Interactive work is what the engine runs for network requests; batch work is what batch lines submit (both counted
by `server.api.serving.EngineCall` in `Runtime.work`). The rule, checked before every line starts:

- no interactive request in flight for `quiet_s` (1 s): batch lines run up to `--batch-max-in-flight` (the runner's
  own bound);
- interactive requests in flight and some engine request waiting for a row: no new batch line;
- interactive requests in flight, nothing waiting: batch engine requests stay below `--batch-share` of
  `--max-batch-size` rows (0: none while interactive traffic is present).

Lines already running are never cancelled for interactive traffic. The engine's scheduler keeps them in place
(server/engine/scheduler.py): while an interactive request runs or waits, only the share's rows of batch work join
a step and the others pause with their key/value blocks kept; an interactive request short of memory takes blocks
from batch rows first; and a step of batch rows alone stops at its next layer when an interactive request arrives.
"""

from __future__ import annotations

import time

from server.engine.config import batch_rows


class Gate:
    """The default: always open (a worker without interactive traffic runs at full capacity)."""

    def open(self) -> bool:
        return True


class IdleCapacity(Gate):
    def __init__(self, work, engine, share: float, max_batch_size: int, quiet_s: float = 1.0):
        self.work, self.engine, self.quiet_s = work, engine, quiet_s
        self.rows = batch_rows(share, max_batch_size)
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
