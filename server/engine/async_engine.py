"""Drive the engine from one background thread and hand each request its outputs as an async stream.

The loop thread owns the engine; other threads talk to it only through an inbox. Outputs travel back to the
caller's event loop with `call_soon_threadsafe`. If the loop dies, every waiting stream gets an error and `ready`
turns false, so readiness probes take the replica out of service.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from .engine import LLMEngine
from .request import EngineOverloaded, EngineRequest, EngineStopped, RequestOutput, Sequence

log = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request: iterate for deltas (the last has finished=True), or await `result()`."""

    def __init__(self, seq: Sequence, owner: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self.seq = seq
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    def _put(self, out: RequestOutput) -> None:  # called on the caller's loop
        self._queue.put_nowait(out)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finished:
            self.finished = True
        return out

    async def result(self) -> RequestOutput:
        """Wait for the end; the final output carries the whole text."""
        last = None
        async for out in self:
            last = out
        return last

    def cancel(self) -> None:
        """Cancel (client gone): the row is freed at the next step."""
        if not self.finished:
            self._owner._inbox.put(("abort", self.seq))


@dataclass
class EngineStats:
    running: int
    waiting: int
    in_flight: int
    steps: int
    loop_alive: bool


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 1024):
        self.engine = engine
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self.steps = 0

    # ---- lifecycle
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive() and self._failed is None

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to grace_s, cancel the rest, stop the loop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            leftover = list(self._streams.values())
        for stream in leftover:
            stream.cancel()
        end = time.monotonic() + 5
        while self.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    def stats(self) -> EngineStats:
        sched = self.engine.scheduler
        return EngineStats(running=sched.num_running, waiting=sched.num_waiting, in_flight=self.in_flight,
                           steps=self.steps, loop_alive=self.ready)

    # ---- what the HTTP layer needs of the engine, without reaching into it (thread-safe: tokenizer calls are locked)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def decode_ids(self, ids: list[int]) -> str:
        return self.engine.decode_ids(ids)

    def token_strings(self, ids: list[int]) -> list[str]:
        return self.engine.token_strings(ids)

    def compile_constraint(self, constraint) -> None:
        """Compile (and cache) an output constraint; call it off the event loop."""
        self.engine.grammars.compile(constraint)

    def kv_stats(self) -> dict:
        return self.engine.kv_stats()

    # ---- requests
    def submit(self, request: EngineRequest) -> RequestStream:
        """Validate and queue a request. Raises InvalidRequest/InputTooLong (bad input), EngineOverloaded (queue
        full) or EngineStopped (shutting down, or the loop died)."""
        if not self.ready:
            raise EngineStopped("the engine is not accepting requests" if self._failed is None
                                else f"the engine loop failed: {self._failed!r}")
        seq = self.engine.make_sequence(request)
        stream = RequestStream(seq, self, asyncio.get_running_loop())
        with self._lock:
            if len(self._streams) >= self.max_queue:
                raise EngineOverloaded(f"{len(self._streams)} requests in flight; the limit is {self.max_queue}")
            if request.request_id in self._streams:
                raise EngineOverloaded(f"request id {request.request_id} is already in flight")
            self._streams[request.request_id] = stream
        self._inbox.put(("add", seq))
        if request.priority != "batch":
            self.engine.interrupt.set()  # a step of batch rows alone gives way now, not when it ends
        self._wake.set()
        return stream

    # ---- the loop thread
    def _drain_inbox(self) -> None:
        self.engine.interrupt.clear()  # what arrives from here on sets it again
        while True:
            try:
                kind, seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.add(seq)
            elif kind == "abort":
                self.engine.abort(seq)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
                if stream is not None and out.finished:
                    del self._streams[out.request_id]
            if stream is not None:
                try:
                    stream._loop.call_soon_threadsafe(stream._put, out)
                except RuntimeError:  # the caller's loop is gone
                    pass

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_work():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step())
                self.steps += 1
        except BaseException as e:  # surface through readiness and to every waiting caller
            self._failed = e
            log.exception("engine loop died")
            with self._lock:
                streams = list(self._streams.values())
                self._streams.clear()
            for s in streams:
                out = RequestOutput(s.request_id, [], "", finished=True, finish_reason="error",
                                    error="the engine loop failed")
                try:
                    s._loop.call_soon_threadsafe(s._put, out)
                except RuntimeError:
                    pass
