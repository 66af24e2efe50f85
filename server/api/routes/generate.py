"""Native generate (JSON or Server-Sent Events) and classify, by task id or id@version."""

from __future__ import annotations

import json
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Path, Request

from server.engine.request import SamplingParams

from ..access import find_visible, prompt_ref
from ..deps import EngineDep, RuntimeDep, StoreDep, TenantDep
from ..schemas import (
    ClassifyRequest,
    ClassifyResult,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    TokenEvent,
    Usage,
)
from ..serving import Job, check_output, event_stream, precompile, sampling

router = APIRouter(prefix="/v1/tasks", tags=["generate"])

TaskRef = Annotated[str, Path(description="a task id, or id@version to pin a version", max_length=270)]
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 503)}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.post("/{task_id}/generate", response_model=GenerateResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"}})
async def generate(task_id: TaskRef, body: GenerateRequest, request: Request, principal: TenantDep, store: StoreDep,
                   engine: EngineDep, rt: RuntimeDep):
    """Generate text for one input with the task's prompt. `stream: true` sends `token` events, then `done`."""
    record = find_visible(store, principal, task_id)
    params = sampling(record.generation, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                      top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop,
                      cap=rt.settings.max_new_tokens, logit_bias=body.logit_bias,
                      presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                      response_format=body.response_format, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
    await precompile(engine, params)
    job = Job.start(rt, engine, principal, prompt_ref(store, record), [body.input], "generate", params, "gen")
    if not body.stream:
        out = check_output((await job.results(request))[0])
        return GenerateResponse(id=job.id, task=record.ref, text=out.text, finish_reason=out.finish_reason,
                                usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens))
    return event_stream(job, _generate_events(job, record.ref), lambda error: sse("error", error))


async def _generate_events(job: Job, task_key: str) -> AsyncIterator[bytes]:
    index = 0
    async for _, out in job.events():
        ids = out.new_token_ids
        for k, tid in enumerate(ids):
            yield sse("token", TokenEvent(index=index, id=tid, text=out.new_text if k == len(ids) - 1 else "")
                      .model_dump())
            index += 1
        if not ids and out.new_text:  # text held back for a split character, flushed at the end
            yield sse("token", TokenEvent(index=index, id=None, text=out.new_text).model_dump())
        if out.finished:
            if out.finish_reason == "error":
                yield sse("error", {"error": {"type": "engine_error", "message": out.error or "failed"}})
                return
            done = GenerateResponse(id=job.id, task=task_key, text=out.text, finish_reason=out.finish_reason,
                                    usage=Usage(prompt_tokens=out.prompt_tokens,
                                                completion_tokens=out.completion_tokens))
            yield sse("done", done.model_dump())


@router.post("/{task_id}/classify", response_model=ClassifyResult | list[ClassifyResult], responses=ERRORS)
async def classify(task_id: TaskRef, body: ClassifyRequest, request: Request, principal: TenantDep, store: StoreDep,
                   engine: EngineDep, rt: RuntimeDep):
    """Score every label's verbalizer after the prompt; one result per input (a list for a list)."""
    record = find_visible(store, principal, task_id)
    texts = body.input if isinstance(body.input, list) else [body.input]
    job = Job.start(rt, engine, principal, prompt_ref(store, record), texts, "classify",
                    SamplingParams(max_new_tokens=1), "cls")
    results = []
    for out in await job.results(request):
        check_output(out)
        scores = dict(zip(out.labels or [], out.label_probs or []))
        results.append(ClassifyResult(label=max(scores, key=scores.get), scores=scores))
    return results if isinstance(body.input, list) else results[0]
