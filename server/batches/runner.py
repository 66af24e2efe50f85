"""BatchRunner: claims batches under a lease and runs their lines, on a thread and event loop of its own.

Its own loop means that nothing a batch does (reading its file, JSON, fsync, tokenizing its lines in the route's
submit) holds up the event loop that serves HTTP. Up to `max_batches` batches run at once and share
`max_in_flight` lines in flight, so one tenant's huge batch does not hold every other batch back (the engine's fair
share then splits rows between their tenants). A line starts only when the gate says so (gate.py: idle capacity,
`--batch-share`); inside the engine, batch rows pause while interactive work runs.

The runner never touches the engine: a line is a call into the app (executor.py), so the same code runs in the
server and in `python -m server.batch_worker`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from training.files import FileStore

from .gate import Gate
from .records import BatchRecord
from .run import BatchRun
from .store import BatchStore

log = logging.getLogger("server.batches")


@dataclass
class BatchRunnerConfig:
    max_in_flight: int = 16      # batch lines in flight in this process, all batches together
    max_batches: int = 4         # batches run at once
    lease_s: float = 60.0        # a runner that stops renewing for this long loses its batches to another
    poll_s: float = 0.5          # how often an idle runner looks for batches
    sync_s: float = 1.0          # a running batch's record (counts, lease, a cancel from elsewhere) at most this often
    tick_s: float = 0.05         # how often a running batch looks at its window, cancel and the runner's stop
    gate_poll_s: float = 0.005   # how often a line held by the gate asks again
    retry_s: float = 1.0         # wait before retrying a line answered 429/503 without Retry-After
    fsync: bool = True           # output lines are fsynced as they are written


class BatchRunner:
    """`executor_for(rec)` runs a batch's lines (executor.InProcess), `visible_for(rec)` says which models its
    tenant may use (validate.Visible), `cap_for(rec)` bounds one batch's lines in flight (half its tenant's
    concurrency in the server, so the tenant's own interactive calls keep room)."""

    def __init__(self, store: BatchStore, files: FileStore, executor_for: Callable, visible_for: Callable,
                 gate: Gate | None = None, config: BatchRunnerConfig | None = None, base_model: str | None = None,
                 cap_for: Callable[[BatchRecord], int] | None = None,
                 on_line: Callable[[str], None] | None = None):
        self.store, self.files = store, files
        self.executor_for, self.visible_for = executor_for, visible_for
        self.gate = gate or Gate()
        self.config = config or BatchRunnerConfig()
        self.base_model = base_model
        self.cap_for = cap_for or (lambda rec: self.config.max_in_flight)
        self.on_line = on_line or (lambda outcome: None)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock: Callable[[], float] = time.time   # what the completion window is measured against
        self.in_flight = 0           # lines in flight, all batches
        self.peak_in_flight = 0
        self.running: dict[str, BatchRun] = {}
        self._cancel: set[str] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.slot: asyncio.Event | None = None   # set whenever a line finishes
        self._thread: threading.Thread | None = None

    # ---- control, from any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="batches", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every running batch where it is (lines in flight are cancelled and rerun by whoever resumes it) and
        release their leases."""
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wake(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop has ended
                pass

    def cancel(self, batch_id: str) -> None:
        """Seen within a tick by the batch's run (a cancel through another replica arrives with the next sync)."""
        self._cancel.add(batch_id)
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def cancelled(self, batch_id: str) -> bool:
        return batch_id in self._cancel

    # ---- the loop
    def _main(self) -> None:
        # (not at a lower OS priority, unlike the training runner: its own work is light, and on a busy CPU a
        # lowered thread answered late)
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake, self.slot = asyncio.Event(), asyncio.Event()
        tasks: set[asyncio.Task] = set()
        while not self._stopping:
            rec = None
            if len(self.running) < self.config.max_batches:
                try:
                    rec = await asyncio.to_thread(self.store.claim, self.owner, self.config.lease_s, self._mine)
                except Exception:  # a bad record must not stop the runner
                    log.exception("claiming a batch failed")
            if rec is not None:
                run = self.running[rec.id] = BatchRun(self, rec)
                task = asyncio.create_task(self._run(run))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _mine(self, rec: BatchRecord) -> bool:
        """Only batches made on the model this runner serves (another model would answer differently)."""
        return rec.base_model is None or self.base_model is None or rec.base_model == self.base_model

    async def _run(self, run: BatchRun) -> None:
        try:
            await run.go()
        except Exception as e:  # the batch fails, the runner goes on
            log.exception("batch %s failed", run.rec.id)
            await asyncio.to_thread(run.fail, f"{type(e).__name__}: {e}")
        finally:
            self.running.pop(run.rec.id, None)
            self._cancel.discard(run.rec.id)

    def line_started(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def line_ended(self) -> None:
        self.in_flight -= 1
        if self.slot is not None:
            self.slot.set()
