"""OpenAI-compatible endpoints: models, completions, chat completions. What `model` names, the chat prompt, and
every body and chunk these routes send are OpenAI's protocol, in server/api/openai_format.py."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from server.auth import OPEN_TENANT

from ..access import created_epoch, list_visible
from ..deps import EngineDep, RuntimeDep, StoreDep, TenantDep
from ..errors import documented
from ..openai_format import (
    LogprobListing,
    base_card,
    chat_chunks,
    chat_prompt,
    chat_response,
    chat_top_logprobs,
    completion_chunks,
    completion_inputs,
    completion_response,
    resolve,
)
from ..schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from ..serving import EngineCall, check_output, choices, precompile
from ..sse import event_stream

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS = documented(401, 404, 413, 422, 429, 503)
STREAMS = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}}


@router.get("/models", response_model=ModelList, responses=ERRORS)
def models(principal: TenantDep, store: StoreDep, rt: RuntimeDep) -> ModelList:
    """The bare model as `default` (unless turned off), then the tasks this tenant may use (its own and public)."""
    base = [base_card(rt)] if rt.settings.serve_base_model else []
    return ModelList(data=base + [ModelCard(id=r.id, created=created_epoch(r), owned_by=r.tenant or OPEN_TENANT)
                                  for r in list_visible(store, principal)])


@router.get("/models/{model}", response_model=ModelCard, responses=ERRORS)
def model(model: str, principal: TenantDep, store: StoreDep, rt: RuntimeDep) -> ModelCard:
    served = resolve(rt, store, principal, model)
    if served.record is None:
        return base_card(rt)
    r = served.record
    return ModelCard(id=model, created=created_epoch(r), owned_by=r.tenant or OPEN_TENANT)


@router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, **STREAMS})
async def completions(body: CompletionRequest, request: Request, principal: TenantDep, store: StoreDep,
                      engine: EngineDep, rt: RuntimeDep):
    """Each prompt is one input to the task named by `model`; `n` choices per prompt, in order."""
    served = resolve(rt, store, principal, body.model)
    texts, ids = completion_inputs(body)
    params = body.to_sampling(served.generation, rt.settings.max_new_tokens)
    await precompile(engine, params)
    call = EngineCall.start(rt, engine, principal, served.prompt, texts, "score" if body.max_tokens == 0 else
                            "generate", choices(params, body.n) * (len(texts) // body.n), "cmpl", input_ids=ids,
                            echo=body.echo, logprobs=body.logprobs, share_prompt=body.n > 1)
    # what echo puts in front of the completion: the prompt as sent (token ids: their text, specials kept)
    echoes = [(engine.decode_ids(i) if i is not None else t) if body.echo else "" for t, i in zip(texts, ids)]
    listing = LogprobListing(engine) if body.logprobs is not None else None
    created = int(time.time())
    if body.stream:
        return event_stream(call, completion_chunks(call, body, created, echoes, listing))
    outs = [check_output(o) for o in await call.results(request)]
    return completion_response(call, body, created, outs, echoes, listing)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, **STREAMS})
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: TenantDep, store: StoreDep,
                           engine: EngineDep, rt: RuntimeDep):
    """Chat with a task or the bare model; what the model sees depends on the task (docs/api.md)."""
    served = resolve(rt, store, principal, body.model)
    prompt, text = chat_prompt(engine.tokenizer, served, body, body.model)
    top_n = chat_top_logprobs(body)
    params = body.to_sampling(served.generation, rt.settings.max_new_tokens)
    await precompile(engine, params)
    call = EngineCall.start(rt, engine, principal, prompt, [text] * body.n, "generate", choices(params, body.n),
                            "chatcmpl", logprobs=top_n, share_prompt=body.n > 1)
    listing = LogprobListing(engine) if top_n is not None else None
    created = int(time.time())
    if body.stream:
        return event_stream(call, chat_chunks(call, body, created, listing))
    outs = [check_output(o) for o in await call.results(request)]
    return chat_response(call, body, created, outs, listing)
