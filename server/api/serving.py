"""Running engine requests for a route: admission, submission, waiting, and cancellation when the client leaves.

Every route that generates or classifies goes through an `EngineCall`, so quotas are charged, slots are freed and
disconnects cancel work the same way for the native and the OpenAI endpoints (and for a batch's lines, which run
through the same routes).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.auth import Principal
from server.engine.async_engine import AsyncEngine, RequestStream
from server.engine.request import EngineRequest, Mode, PromptRef, RequestOutput, SamplingParams
from server.runtime import Runtime

from .errors import ApiError, ClientGone
from .limits import Admission

log = logging.getLogger("server.requests")

ENGINE_FAILED = "the request failed in the engine"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class EngineCall:
    """One route's engine requests (one per input), holding the tenant's admission until all have finished."""
    rt: Runtime
    streams: list[RequestStream]
    admission: Admission
    id: str
    finals: list[RequestOutput | None] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)
    priority: str = "interactive"   # "batch" for a batch's line (principal.batch): runs from idle capacity
    _closed: bool = False

    def _final(self, i: int, out: RequestOutput) -> None:
        self.finals[i] = out
        if self.priority == "interactive":  # the latency histograms describe interactive traffic
            self.rt.metrics.observe_tpot(out, time.monotonic() - self.submitted_at)

    @classmethod
    def start(cls, rt: Runtime, engine: AsyncEngine, principal: Principal, prompt: PromptRef, texts: list[str],
              mode: Mode, params: SamplingParams | list[SamplingParams], prefix: str = "req", *,
              input_ids: list[list[int] | None] | None = None, echo: bool = False,
              logprobs: int | None = None, share_prompt: bool = False) -> "EngineCall":
        """Admit (429), then submit every input (422/413/503 raise here, before any response is sent).
        input_ids[i], when given, is input i as token ids (texts[i] is then unused). `params` is one for all
        inputs, or one per input. share_prompt: the inputs are choices of repeated prompts (n > 1), whose prefill
        is shared."""
        per_input = params if isinstance(params, list) else [params] * len(texts)
        priority = "batch" if principal.batch else "interactive"
        admission = rt.limiter.acquire(principal.tenant, len(texts))
        call_id = new_id(prefix)
        streams: list[RequestStream] = []
        try:
            for i, text in enumerate(texts):
                rid = call_id if len(texts) == 1 else f"{call_id}-{i}"
                ids = input_ids[i] if input_ids is not None else None
                streams.append(engine.submit(EngineRequest(
                    request_id=rid, prompt=prompt, text=text, mode=mode, sampling=per_input[i],
                    tenant=principal.tenant, input_ids=tuple(ids) if ids is not None else None, echo=echo,
                    logprobs=logprobs, share_prompt=share_prompt, priority=priority)))
        except BaseException:
            for s in streams:
                s.cancel()
            admission.release(0)
            raise
        rt.work.add(priority, len(streams))
        if rt.settings.log_requests:
            log.info("%s tenant=%s task=%s mode=%s inputs=%r", call_id, principal.tenant, prompt.key, mode, texts)
        else:
            log.debug("%s tenant=%s task=%s mode=%s inputs=%d", call_id, principal.tenant, prompt.key, mode, len(texts))
        return cls(rt=rt, streams=streams, admission=admission, id=call_id, finals=[None] * len(streams),
                   priority=priority)

    def close(self) -> None:
        """Cancel whatever has not finished and release the admission with the tokens actually used."""
        if self._closed:
            return
        self._closed = True
        for s in self.streams:
            s.cancel()
        used = sum(f.prompt_tokens + f.completion_tokens for f in self.finals if f is not None)
        self.admission.release(used)
        self.rt.work.add(self.priority, -len(self.streams))
        if self.priority == "batch":
            self.rt.metrics.batch_tokens.inc(used)

    async def results(self, request: Request) -> list[RequestOutput]:
        """Wait for every final output; if the client disconnects first, cancel all and raise ClientGone."""
        async def collect() -> None:
            for i, s in enumerate(self.streams):
                self._final(i, await s.result())

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise ClientGone()
            work.result()
            return [f for f in self.finals if f is not None]
        finally:
            for t in (work, gone):
                t.cancel()
            self.close()

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(input index, delta) as they come from all streams; close() must run afterwards (routes use finally)."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                if out.finished:
                    self._final(0, out)
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            async for out in s:
                await queue.put((i, out))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(self.streams)
            while remaining:
                i, out = await queue.get()
                if out.finished:
                    self._final(i, out)
                    remaining -= 1
                yield i, out
        finally:
            for t in tasks:
                t.cancel()


async def precompile(engine: AsyncEngine, params: SamplingParams) -> None:
    """Compile a request's constraint in a worker thread (a cache hit costs nothing), so the submit that follows
    finds it compiled and the event loop never waits on the grammar library."""
    if params.constraint is not None:
        await run_in_threadpool(engine.compile_constraint, params.constraint)


def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices of one prompt: with a seed, choice i samples with seed + i, so the set is reproducible."""
    if n == 1:
        return [params]
    return [params if params.seed is None else replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone. The body was already read, so the next ASGI message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def check_output(out: RequestOutput, fallback: str = ENGINE_FAILED) -> RequestOutput:
    """The one engine-error branch: a request that failed in the engine is a 500 `engine_error` for that request
    alone (inside a stream, sse.event_stream turns it into the stream's error event); `fallback` is the message
    when the engine gave none."""
    if out.finished and out.finish_reason == "error":
        raise ApiError(500, "engine_error", out.error or fallback)
    return out
