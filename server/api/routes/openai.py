"""OpenAI-compatible endpoints. `model` is a task id (or id@version); the prompt or chat is the task's input.

Completions put the prompt into the task's template, after its virtual tokens, exactly as the native generate
does. Chat renders the messages with the model's chat template first, and that text becomes the task's input.
"""

from __future__ import annotations

import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.engine.request import RequestOutput

from ..access import created_epoch, find_visible, list_visible, prompt_ref
from ..deps import EngineDep, RuntimeDep, StoreDep, TenantDep
from ..errors import ApiError, status_of
from ..schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionRequest, CompletionResponse,
                       CompletionUsage, ErrorResponse, ModelCard, ModelList)
from ..schemas import MAX_BATCH_INPUTS, OpenAIBase, ResponseFormat
from ..serving import Job, check_output, choices, precompile, sampling

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _data(obj) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _usage(outs: list[RequestOutput], n: int = 1) -> CompletionUsage:
    """Like OpenAI, a prompt's tokens count once however many choices (n) it has."""
    p = sum(o.prompt_tokens for o in outs[::n])
    c = sum(o.completion_tokens for o in outs)
    return CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _finish(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def _response_format(body: OpenAIBase) -> ResponseFormat | None:
    """response_format, or vLLM's guided_json / guided_regex / guided_choice: at most one of them."""
    given = [k for k in ("response_format", "guided_json", "guided_regex", "guided_choice")
             if getattr(body, k) is not None]
    if len(given) > 1:
        raise ApiError(422, "invalid_request", f"give at most one output constraint; found {given}")
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as e:
                why = e if isinstance(e, ValueError) else "nested too deeply"
                raise ApiError(422, "invalid_request", f"guided_json is not JSON: {why}") from None
            if not isinstance(schema, dict):
                raise ApiError(422, "invalid_request", "guided_json must be a JSON schema object")
        return ResponseFormat(type="json_schema", json_schema={"schema": schema})
    if body.guided_regex is not None:
        return ResponseFormat(type="regex", regex=body.guided_regex)
    if body.guided_choice is not None:
        return ResponseFormat(type="choice", choice=body.guided_choice)
    return body.response_format


def _output_fields(body: OpenAIBase) -> dict:
    """The sampling fields every OpenAI route passes on."""
    return {"logit_bias": body.logit_bias, "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "response_format": _response_format(body)}


@router.get("/models", response_model=ModelList, responses=ERRORS)
def models(principal: TenantDep, store: StoreDep) -> ModelList:
    """The tasks this tenant may use (its own and public ones), as OpenAI models."""
    return ModelList(data=[ModelCard(id=r.id, created=created_epoch(r), owned_by=r.tenant or "promptserve")
                           for r in list_visible(store, principal)])


@router.get("/models/{model}", response_model=ModelCard, responses=ERRORS)
def model(model: str, principal: TenantDep, store: StoreDep) -> ModelCard:
    r = find_visible(store, principal, model)
    return ModelCard(id=model, created=created_epoch(r), owned_by=r.tenant or "promptserve")


@router.post("/completions", response_model=CompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}})
async def completions(body: CompletionRequest, request: Request, principal: TenantDep, store: StoreDep,
                      engine: EngineDep, rt: RuntimeDep):
    """Each prompt is one input to the task named by `model`; `n` choices per prompt, in order."""
    record = find_visible(store, principal, body.model)
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    params = sampling(record.generation, max_new_tokens=body.max_tokens, temperature=body.temperature,
                      top_p=body.top_p, seed=body.seed, stop=body.stop,
                      cap=rt.settings.max_new_tokens, **_output_fields(body))
    await precompile(engine, params)
    # choice index = prompt index * n + choice of that prompt, as OpenAI orders them
    texts = [p for p in prompts for _ in range(body.n)]
    if len(texts) > MAX_BATCH_INPUTS:
        raise ApiError(422, "invalid_request", f"{len(prompts)} prompts x n={body.n} make {len(texts)} choices; "
                                               f"the limit is {MAX_BATCH_INPUTS}")
    job = Job.start(rt, engine, principal, prompt_ref(store, record), texts, "generate",
                    choices(params, body.n) * len(prompts), "cmpl", share_prompt=body.n > 1)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_completion_chunks(job, body.model, created, include_usage, body.n),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    outs = [check_output(o) for o in await job.results(request)]
    return CompletionResponse(id=job.id, created=created, model=body.model, usage=_usage(outs, body.n), choices=[
        CompletionChoice(index=i, text=o.text, finish_reason=_finish(o)) for i, o in enumerate(outs)])


async def _completion_chunks(job: Job, model: str, created: int, include_usage: bool,
                             n: int = 1) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict], usage: CompletionUsage | None = None) -> bytes:
        body = {"id": job.id, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage.model_dump()
        return _data(body)

    try:
        async for i, out in job.events():
            if out.finished and out.finish_reason == "error":
                raise ApiError(500, "engine_error", out.error or "the request failed in the engine")
            if out.new_text or out.finished:
                yield chunk([{"index": i, "text": out.new_text, "logprobs": None,
                              "finish_reason": _finish(out) if out.finished else None}])
        if include_usage:
            yield chunk([], _usage([f for f in job.finals if f is not None], n))
        yield _data("[DONE]")
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band as OpenAI does
        yield _data(_stream_error(e))
    finally:
        job.close()


def _stream_error(e: Exception) -> dict:
    status, type_ = status_of(e)
    return {"error": {"type": type_, "message": str(e) if status < 500 or isinstance(e, ApiError) else "internal"}}


def render_chat(engine, body: ChatCompletionRequest) -> str:
    """The model's own chat template, ending with the assistant's turn; the task's prompt then wraps this text."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    tokenizer = engine.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - templates raise on role orders they do not support
        raise ApiError(422, "invalid_request", f"messages do not fit the model's chat template: {e}") from None


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}})
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: TenantDep, store: StoreDep,
                           engine: EngineDep, rt: RuntimeDep):
    """Chat with a task: the chat-templated conversation is the task's input."""
    record = find_visible(store, principal, body.model)
    text = render_chat(engine, body)
    params = sampling(record.generation, max_new_tokens=body.max_completion_tokens or body.max_tokens,
                      temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop,
                      cap=rt.settings.max_new_tokens, **_output_fields(body))
    await precompile(engine, params)
    job = Job.start(rt, engine, principal, prompt_ref(store, record), [text] * body.n, "generate",
                    choices(params, body.n), "chatcmpl", share_prompt=body.n > 1)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_chunks(job, body.model, created, include_usage, body.n),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    outs = [check_output(o) for o in await job.results(request)]
    return ChatCompletionResponse(id=job.id, created=created, model=body.model, usage=_usage(outs, body.n), choices=[
        ChatChoice(index=i, message=AssistantMessage(content=o.text), finish_reason=_finish(o))
        for i, o in enumerate(outs)])


async def _chat_chunks(job: Job, model: str, created: int, include_usage: bool,
                       n: int = 1) -> AsyncIterator[bytes]:
    def chunk(delta: ChatDelta | None, finish: str | None = None, usage: CompletionUsage | None = None,
              index: int = 0) -> bytes:
        choices = [] if delta is None else [ChatChunkChoice(index=index, delta=delta, finish_reason=finish)]
        return _data(ChatCompletionChunk(id=job.id, created=created, model=model, choices=choices, usage=usage)
                     .model_dump(exclude_none=True))

    try:
        for i in range(len(job.streams)):  # one choice per stream (n)
            yield chunk(ChatDelta(role="assistant", content=""), index=i)
        async for i, out in job.events():
            if out.finished and out.finish_reason == "error":
                raise ApiError(500, "engine_error", out.error or "the request failed in the engine")
            if out.new_text:
                yield chunk(ChatDelta(content=out.new_text), index=i)
            if out.finished:
                yield chunk(ChatDelta(), _finish(out), index=i)
        if include_usage:
            yield chunk(None, usage=_usage([f for f in job.finals if f is not None], n))
        yield _data("[DONE]")
    except Exception as e:  # noqa: BLE001
        yield _data(_stream_error(e))
    finally:
        job.close()
