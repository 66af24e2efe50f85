"""One batch's run: validate, resume, feed its lines through the gate, write each answer durably, finish.

Stops, and what each leaves (first one wins, except that a shutdown or a lost lease overrides a cancel or expiry):
- cancel: no new line starts; lines in flight finish and are written; then `cancelled` with the partial output.
- expired (the completion window passed): lines in flight are cancelled; every line not done goes to the error
  file with `batch_expired`; then `expired`, outputs so far kept.
- shutdown (the runner stops): lines in flight are cancelled, the lease is released; whoever claims the batch next
  resumes it: lines already in the output or error file are skipped (output.recover), the rest run.
- lost (another runner holds the lease: this one was presumed dead): stop at once and write nothing more.
Interactive traffic never cancels a line: the engine pauses batch rows in place while it runs (scheduler.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from .executor import Answer
from .output import Appender, LineSet, recover
from .records import ERRORS_NAME, INPUT_NAME, OUTPUT_NAME, TERMINAL, BatchRecord, line_request_id
from .validate import check_file

if TYPE_CHECKING:
    from .runner import BatchRunner

log = logging.getLogger("server.batches")

RANK = {"cancel": 1, "expired": 1, "shutdown": 2, "lost": 3}
ENDING = {None: "completed", "cancel": "cancelled", "expired": "expired", "shutdown": None, "lost": None}
EXPIRED = {"code": "batch_expired", "message": "This request could not be executed before the completion window "
                                               "expired."}
RETRYABLE = (429, 503)   # the tenant's rate or concurrency, the engine's queue: wait and retry, never fail the line


class BatchRun:
    def __init__(self, runner: BatchRunner, rec: BatchRecord):
        self.runner, self.rec = runner, rec
        self.dir = runner.store.batch_dir(rec.id)
        self.done = LineSet()
        self.completed = self.failed = 0
        self.in_flight = 0
        self.cap = max(1, runner.cap_for(rec))
        self.tasks: dict[asyncio.Task, tuple[float, int, bytes]] = {}   # (started, line, raw) of lines in flight
        self.stop: str | None = None
        self.stopped = asyncio.Event()
        self.out: Appender | None = None
        self.err: Appender | None = None
        self._watching = False

    # ---- the whole run
    async def go(self) -> None:
        if self.rec.status == "validating" and not await self._validate():
            return
        self.completed = await asyncio.to_thread(recover, self.dir / OUTPUT_NAME, self.done)
        self.failed = await asyncio.to_thread(recover, self.dir / ERRORS_NAME, self.done)
        fsync = self.runner.config.fsync
        self.out, self.err = Appender(self.dir / OUTPUT_NAME, fsync), Appender(self.dir / ERRORS_NAME, fsync)
        try:
            if self.rec.ending is not None:   # it was publishing its files when its runner stopped
                ending = self.rec.ending
            else:
                ending = ENDING[await self._run_lines()]
                if ending == "expired":
                    await asyncio.to_thread(self._expire_rest)
        finally:
            self.out.close()
            self.err.close()
        if self.stop == "shutdown":
            await asyncio.to_thread(self.runner.store.release, self.rec.id, self.runner.owner)
        if ending is not None:
            await asyncio.to_thread(self._finish, ending)

    async def _validate(self) -> bool:
        rec = self.rec
        checked = await asyncio.to_thread(check_file, self.dir / INPUT_NAME, rec.endpoint,
                                          self.runner.visible_for(rec), rec.input_file_id)
        now = int(time.time())

        def change(r: BatchRecord) -> None:
            r.total = checked.total
            if checked.errors:
                r.status, r.failed_at, r.errors = "failed", now, checked.errors
                r.lease_owner, r.lease_until = None, 0.0
            elif r.status == "validating":   # (a cancel may have come meanwhile: it stays cancelling)
                r.status, r.in_progress_at = "in_progress", now
        self.rec = await asyncio.to_thread(self.runner.store.update, rec.id, change)
        if checked.errors:
            self._clean()
            log.info("%s failed validation: %s", rec.id, checked.errors[0]["message"])
        return not checked.errors

    async def _run_lines(self) -> str | None:
        """Feed every line not done yet and wait for those in flight; the stop reason (None: all done)."""
        if self.rec.status == "cancelling" or self.rec.cancel_requested:
            return "cancel"
        executor = self.runner.executor_for(self.rec)
        self._watching = True
        watch = asyncio.create_task(self._watch())
        try:
            await self._feed(executor)
            while self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            self._watching = False
            await watch
            for task in list(self.tasks):
                task.cancel()
            await executor.aclose()
        return self.stop

    # ---- lines
    async def _feed(self, executor) -> None:
        """Every line not done, until none is left or a stop."""
        with open(self.dir / INPUT_NAME, "rb") as f:
            lines = enumerate(f, start=1)
            exhausted = False
            while self.stop is None:
                if not exhausted:
                    n, raw = next(lines, (0, b""))
                    exhausted = n == 0
                    if exhausted or n in self.done or not raw.strip():
                        continue
                elif self.tasks:  # the file is read: wait for the lines in flight
                    await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)
                    continue
                else:
                    return
                if not await self._admit():
                    return
                self.in_flight += 1
                self.runner.line_started()
                task = asyncio.create_task(self._line(executor, n, raw))
                self.tasks[task] = (time.monotonic(), n, raw)
                task.add_done_callback(self._line_done)

    async def _admit(self) -> bool:
        """Wait for a slot (this batch's cap, the runner's bound) and for the gate; False once stopped."""
        r = self.runner
        while self._check() is None:
            if self.in_flight >= self.cap or r.in_flight >= r.config.max_in_flight:
                r.slot.clear()
                try:
                    await asyncio.wait_for(r.slot.wait(), r.config.tick_s)
                except asyncio.TimeoutError:
                    pass
            elif not r.gate.open():
                await asyncio.sleep(r.config.gate_poll_s)
            else:
                return True
        return False

    def _line_done(self, task: asyncio.Task) -> None:
        self.tasks.pop(task)
        self.in_flight -= 1
        self.runner.line_ended()
        if not task.cancelled() and task.exception() is not None:
            log.error("a line of %s failed in the runner: %r", self.rec.id, task.exception())

    async def _line(self, executor, n: int, raw: bytes) -> None:
        line = json.loads(raw)
        while True:
            try:
                answer = await executor(line["url"], line["body"])
            except asyncio.CancelledError:
                raise
            except Exception:  # one line's failure is that line's, like a route's 500
                log.exception("line %d of %s", n, self.rec.id)
                answer = Answer(500, {"error": {"type": "internal", "message": "internal server error"}}, None)
            if answer.status not in RETRYABLE:
                break
            if self.stop is not None:
                return  # not run: a resume, or the expiry pass, accounts for it
            try:
                await asyncio.wait_for(self.stopped.wait(), min(60.0, answer.retry_after or self.runner.config.retry_s))
            except asyncio.TimeoutError:
                pass
        if self.stop != "lost":
            self._write(n, line["custom_id"], answer)

    def _write(self, n: int, custom_id: str, answer: Answer) -> None:
        """One output line in OpenAI's format: a 2xx to the output file, anything else to the error file with the
        route's own status and body."""
        rid = line_request_id(self.rec.id, n)
        body = answer.body
        own = body.get("id") if isinstance(body, dict) else None
        entry = {"id": rid, "custom_id": custom_id,
                 "response": {"status_code": answer.status, "request_id": own if isinstance(own, str) else rid,
                              "body": body}, "error": None}
        if 200 <= answer.status < 300:
            self.out.append(entry)
            self.completed += 1
            outcome = "completed"
        else:
            err = body.get("error") if isinstance(body, dict) else None
            entry["error"] = ({"code": err.get("type"), "message": err.get("message")} if isinstance(err, dict)
                              else {"code": "http_error", "message": f"status {answer.status}"})
            self.err.append(entry)
            self.failed += 1
            outcome = "failed"
        self.done.add(n)
        self.runner.on_line(outcome)

    # ---- watching: window, cancel, stop, lease
    async def _watch(self) -> None:
        last_sync = time.monotonic()
        while self._watching:
            self._check()
            if time.monotonic() - last_sync >= self.runner.config.sync_s:
                last_sync = time.monotonic()
                try:
                    seen = await asyncio.to_thread(self._sync)
                except Exception:  # retried at the next sync; the lease outlives several
                    log.exception("syncing %s failed", self.rec.id)
                    seen = None
                if seen is not None:
                    self.set_stop(seen)
            await asyncio.sleep(self.runner.config.tick_s)

    def _check(self) -> str | None:
        if self.runner.stopping:
            self.set_stop("shutdown")
        elif self.runner.cancelled(self.rec.id):
            self.set_stop("cancel")
        elif self.runner.clock() >= self.rec.expires_at:
            self.set_stop("expired")
        return self.stop

    def set_stop(self, reason: str) -> None:
        if self.stop is not None and RANK[reason] <= RANK[self.stop]:
            return
        self.stop = reason
        self.stopped.set()
        if reason != "cancel":
            for task in list(self.tasks):
                task.cancel()

    def _sync(self) -> str | None:
        """Counts and lease into the record; what the record says back: a cancel from another replica, or that
        this runner lost the batch."""
        seen = None

        def change(r: BatchRecord) -> None:
            nonlocal seen
            if r.lease_owner != self.runner.owner or r.status in TERMINAL:
                seen = "lost"
                return
            r.completed, r.failed = self.completed, self.failed
            r.lease_until = time.time() + self.runner.config.lease_s
            if r.cancel_requested:
                seen = "cancel"
        self.runner.store.update(self.rec.id, change)
        return seen

    # ---- endings
    def _expire_rest(self) -> None:
        """Every line not done goes to the error file with batch_expired, a thousand lines per write and fsync."""
        group: list[dict] = []
        with open(self.dir / INPUT_NAME, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if n in self.done or not raw.strip():
                    continue
                group.append({"id": line_request_id(self.rec.id, n), "custom_id": json.loads(raw)["custom_id"],
                              "response": None, "error": EXPIRED})
                self.done.add(n)
                if len(group) >= 1000:
                    self.err.append_many(group)
                    self.failed += len(group)
                    group = []
        if group:
            self.err.append_many(group)
            self.failed += len(group)

    def _finish(self, ending: str) -> None:
        """Publish the output and error files (idempotent: their ids were fixed at creation), then the status."""
        store, files, now = self.runner.store, self.runner.files, int(time.time())

        def begin(r: BatchRecord) -> None:
            r.ending, r.completed, r.failed = ending, self.completed, self.failed
            if ending == "completed" and r.status != "finalizing":
                r.status, r.finalizing_at = "finalizing", now
        rec = store.update(self.rec.id, begin)
        out_id = err_id = None
        if self.completed:
            out_id = files.publish_output(rec.output_file, rec.tenant, f"{rec.id}_output.jsonl",
                                          self.dir / OUTPUT_NAME, self.completed).id
        if self.failed:
            err_id = files.publish_output(rec.error_file, rec.tenant, f"{rec.id}_error.jsonl",
                                          self.dir / ERRORS_NAME, self.failed).id

        def end(r: BatchRecord) -> None:
            status = "cancelled" if ending == "completed" and r.cancel_requested else ending
            r.status, r.output_file_id, r.error_file_id = status, out_id, err_id
            setattr(r, f"{status}_at", now)
            r.lease_owner, r.lease_until = None, 0.0
        self.rec = store.update(self.rec.id, end)
        self._clean()
        log.info("%s %s: %d completed, %d failed", self.rec.id, self.rec.status, self.completed, self.failed)

    def fail(self, message: str) -> None:
        """The runner itself failed on this batch (not a line: those go to the error file)."""
        now = int(time.time())

        def change(r: BatchRecord) -> None:
            r.status, r.failed_at = "failed", now
            r.errors = [{"code": "batch_failed", "message": message[:2000], "param": None, "line": None}]
            r.lease_owner, r.lease_until = None, 0.0
        self.runner.store.update(self.rec.id, change)
        self._clean()

    def _clean(self) -> None:
        """A finished batch's own links to its input and outputs (the published files stay)."""
        for name in (INPUT_NAME, OUTPUT_NAME, ERRORS_NAME):
            (self.dir / name).unlink(missing_ok=True)
