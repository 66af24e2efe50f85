"""Native generate (JSON or Server-Sent Events) and classify, by task id or id@version."""

from __future__ import annotations

from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Path, Request

from server.engine.request import SamplingParams

from ..access import find_visible, prompt_ref
from ..deps import EngineDep, RuntimeDep, StoreDep, TenantDep
from ..errors import documented
from ..schemas import ClassifyRequest, ClassifyResult, GenerateRequest, GenerateResponse, TokenEvent
from ..serving import EngineCall, check_output, precompile
from ..sse import event_stream, sse

router = APIRouter(prefix="/v1/tasks", tags=["generate"])

TaskRef = Annotated[str, Path(description="a task id, or id@version to pin a version", max_length=270)]
ERRORS = documented(401, 404, 413, 422, 429, 503)


@router.post("/{task_id}/generate", response_model=GenerateResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"}})
async def generate(task_id: TaskRef, body: GenerateRequest, request: Request, principal: TenantDep, store: StoreDep,
                   engine: EngineDep, rt: RuntimeDep):
    """Generate text for one input with the task's prompt. `stream: true` sends `token` events, then `done`."""
    record = find_visible(store, principal, task_id)
    params = body.to_sampling(record.generation, rt.settings.max_new_tokens)
    await precompile(engine, params)
    call = EngineCall.start(rt, engine, principal, prompt_ref(store, record), [body.input], "generate", params, "gen")
    if not body.stream:
        out = check_output((await call.results(request))[0])
        return GenerateResponse.of(call.id, record.ref, out)
    return event_stream(call, _generate_events(call, record.ref), "error")


async def _generate_events(call: EngineCall, task_key: str) -> AsyncIterator[bytes]:
    index = 0
    async for _, out in call.events():
        ids = out.new_token_ids
        for k, tid in enumerate(ids):
            yield sse(TokenEvent(index=index, id=tid, text=out.new_text if k == len(ids) - 1 else "").model_dump(),
                      "token")
            index += 1
        if not ids and out.new_text:  # text held back for a split character, flushed at the end
            yield sse(TokenEvent(index=index, id=None, text=out.new_text).model_dump(), "token")
        if out.finished:
            check_output(out, "failed")  # the stream's error event
            yield sse(GenerateResponse.of(call.id, task_key, out).model_dump(), "done")


@router.post("/{task_id}/classify", response_model=ClassifyResult | list[ClassifyResult], responses=ERRORS)
async def classify(task_id: TaskRef, body: ClassifyRequest, request: Request, principal: TenantDep, store: StoreDep,
                   engine: EngineDep, rt: RuntimeDep):
    """Score every label's verbalizer after the prompt; one result per input (a list for a list)."""
    record = find_visible(store, principal, task_id)
    texts = body.input if isinstance(body.input, list) else [body.input]
    call = EngineCall.start(rt, engine, principal, prompt_ref(store, record), texts, "classify",
                            SamplingParams(max_new_tokens=1), "cls")
    results = [ClassifyResult.of(check_output(out)) for out in await call.results(request)]
    return results if isinstance(body.input, list) else results[0]
