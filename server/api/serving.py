"""Running engine requests for a route: admission, submission, waiting, and cancellation when the client leaves.

Every route that generates or classifies goes through `Job`, so quotas are charged, slots are freed and
disconnects cancel work the same way for the native and the OpenAI endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.auth import Principal
from server.engine import constraints
from server.engine.async_engine import AsyncEngine, RequestStream
from server.engine.request import (
    DEFAULT_MAX_NEW_TOKENS,
    Constraint,
    EngineRequest,
    InvalidRequest,
    Mode,
    PromptRef,
    RequestOutput,
    SamplingParams,
)

from .deps import Runtime
from .errors import ApiError, ClientGone, status_of
from .limits import Admission

log = logging.getLogger("server.requests")

MAX_SCHEMA_CHARS = 100_000  # a JSON schema, as compact JSON


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def constraint_of(fmt) -> Constraint | None:
    """A response_format (the wire model, or its dict as a task stores it) as an engine constraint; None for text.
    Only the shape is checked here; whether the grammar library can compile it is checked by the engine."""
    from .schemas import ResponseFormat  # pydantic only

    if fmt is None:
        return None
    if isinstance(fmt, dict):
        try:
            fmt = ResponseFormat.model_validate(fmt)
        except ValueError as e:
            raise InvalidRequest(f"response_format is invalid: {e}") from None
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object")
    if fmt.type == "regex":
        return constraints.regex(fmt.regex)
    if fmt.type == "choice":
        return constraints.choice(fmt.choice)
    c = constraints.json_schema(fmt.json_schema.schema_, strict=fmt.json_schema.strict is not False)
    if len(c.value) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(f"the JSON schema has {len(c.value)} characters; the limit is {MAX_SCHEMA_CHARS}")
    return c


def logit_bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as sorted (id, bias) pairs; a key that is not a token id is a 422."""
    out = []
    for key, value in (bias or {}).items():
        if not key.strip().isdigit():
            raise InvalidRequest(f"logit_bias keys must be token ids (digits), got {key!r}")
        out.append((int(key), float(value)))
    return tuple(sorted(out))


# what a route uses for a field that neither the request nor the task sets
NATIVE_DEFAULTS = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 0.0}
COMPLETIONS_DEFAULTS = {"max_new_tokens": 16, "temperature": 1.0}   # OpenAI's own defaults
CHAT_DEFAULTS = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 1.0}


def sampling(defaults: dict, *, max_new_tokens=None, temperature=None, top_p=None, top_k=None, seed=None,
             stop=None, cap: int | None = None, server: dict | None = None, logit_bias=None,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, response_format=None,
             min_tokens: int = 0, ignore_eos: bool = False) -> SamplingParams:
    """Request fields win over the task's generation defaults, which win over the route's `server` defaults
    (greedy with 64 tokens natively; max_new_tokens never above the server's `cap`: leaving the field out must
    never be refused). The same order holds on every route. The task's response_format applies unless the request
    sends its own ({"type": "text"} asks for free text)."""
    server = server or NATIVE_DEFAULTS

    def pick(value, name, fallback):
        return value if value is not None else defaults.get(name, server.get(name, fallback))

    stops = stop if stop is not None else defaults.get("stop") or ()
    if isinstance(stops, str):
        stops = (stops,)
    try:
        fallback = server.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        fmt = response_format if response_format is not None else defaults.get("response_format")
        fallback = min(fallback, cap) if cap else fallback
        return SamplingParams(max_new_tokens=int(max_new_tokens if max_new_tokens is not None
                                                 else defaults.get("max_new_tokens", fallback)),
                              temperature=float(pick(temperature, "temperature", 0.0)),
                              top_p=float(pick(top_p, "top_p", 1.0)), top_k=int(pick(top_k, "top_k", 0)),
                              seed=seed, stop=tuple(str(s) for s in stops), logit_bias=logit_bias_of(logit_bias),
                              presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
                              constraint=constraint_of(fmt), min_tokens=int(min_tokens), ignore_eos=bool(ignore_eos))
    except (TypeError, ValueError) as e:  # the task's stored defaults are not numbers: the user's to fix
        if isinstance(e, InvalidRequest):
            raise
        raise InvalidRequest(f"the task's generation defaults are invalid: {e}") from None


@dataclass
class Job:
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
              logprobs: int | None = None, share_prompt: bool = False) -> "Job":
        """Admit (429), then submit every input (422/413/503 raise here, before any response is sent).
        input_ids[i], when given, is input i as token ids (texts[i] is then unused). `params` is one for all
        inputs, or one per input. share_prompt: the inputs are choices of repeated prompts (n > 1), whose prefill
        is shared."""
        per_input = params if isinstance(params, list) else [params] * len(texts)
        priority = "batch" if principal.batch else "interactive"
        admission = rt.limiter.acquire(principal.tenant, len(texts))
        job_id = new_id(prefix)
        streams: list[RequestStream] = []
        try:
            for i, text in enumerate(texts):
                rid = job_id if len(texts) == 1 else f"{job_id}-{i}"
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
            log.info("%s tenant=%s task=%s mode=%s inputs=%r", job_id, principal.tenant, prompt.key, mode, texts)
        else:
            log.debug("%s tenant=%s task=%s mode=%s inputs=%d", job_id, principal.tenant, prompt.key, mode, len(texts))
        return cls(rt=rt, streams=streams, admission=admission, id=job_id, finals=[None] * len(streams),
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


def check_output(out: RequestOutput) -> RequestOutput:
    """An engine-side failure of one request becomes a 500 for that request alone."""
    if out.finish_reason == "error":
        raise ApiError(500, "engine_error", out.error or "the request failed in the engine")
    return out


# ---- streaming: one helper for every route's Server-Sent Events

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def stream_error(e: Exception) -> dict:
    """The one error shape inside a stream, whose headers are already sent: a domain error's own message, never the
    text of an unexpected one."""
    status, type_ = status_of(e)
    message = str(e) if status < 500 or isinstance(e, ApiError) else "internal error"
    return {"error": {"type": type_, "message": message}}


def event_stream(job: Job, events: AsyncIterator[bytes], error_event: Callable[[dict], bytes]) -> StreamingResponse:
    """A job's events as Server-Sent Events: a failure after the headers becomes one in-band error event (formatted
    by `error_event`), and the job lets go of its admission however the stream ends (done, failed, client gone)."""
    async def run() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            yield error_event(stream_error(e))
        finally:
            await events.aclose()
            job.close()

    return StreamingResponse(run(), media_type="text/event-stream", headers=SSE_HEADERS)
