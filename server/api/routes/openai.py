"""OpenAI-compatible endpoints. `model` is a task id (or id@version), or `default`: the bare model, no task prompt.

Completions put the prompt into the task's template, after its virtual tokens, exactly as the native generate
does. Chat depends on the task (docs/api.md, "Chat and tasks"): a task with a format of its own (a soft prompt,
or a template that is already a chat prompt) gets the last user message as its input, so chat equals generate;
a plain hard template wraps the last user message, and the model's chat template wraps the conversation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Request

from prompt_core.spec import INPUT_SLOT, PromptKind, PromptSpec
from server.auth import OPEN_TENANT
from server.engine.request import PromptRef, RequestOutput, TokenLogprob

from ..access import created_epoch, find_visible, list_visible, prompt_ref
from ..deps import EngineDep, Runtime, RuntimeDep, StoreDep, TenantDep
from ..errors import ApiError
from ..schemas import (
    MAX_BATCH_INPUTS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIBase,
    ResponseFormat,
    TopLogprob,
)
from ..serving import CHAT_DEFAULTS, COMPLETIONS_DEFAULTS, Job, check_output, event_stream, precompile, sampling
from ..serving import choices as choice_params

BASE_MODEL_ID = "default"     # the bare model's name on these routes (--serve-base-model)
BASE_MODEL_OWNER = "promptserve"  # the server owns it, not a tenant
BASE_PROMPT = PromptRef(key=BASE_MODEL_ID, spec=PromptSpec(PromptKind.HARD, 0, INPUT_SLOT))


@dataclass(frozen=True)
class Served:
    """What a `model` names: a task version, or the bare model (record None)."""
    prompt: PromptRef
    generation: dict
    record: object = None


def resolve(rt: Runtime, store, principal, model: str) -> Served:
    """The bare model for `default` (unless turned off), else a visible task (404 like any unknown task)."""
    if model == BASE_MODEL_ID and rt.settings.serve_base_model:
        return Served(BASE_PROMPT, {})
    record = find_visible(store, principal, model)
    return Served(prompt_ref(store, record), dict(record.generation), record)


def _base_card(rt: Runtime) -> ModelCard:
    return ModelCard(id=BASE_MODEL_ID, created=int(rt.started_at), owned_by=BASE_MODEL_OWNER)


router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 503)}


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
            "frequency_penalty": body.frequency_penalty, "response_format": _response_format(body),
            "min_tokens": body.min_tokens, "ignore_eos": body.ignore_eos}


@router.get("/models", response_model=ModelList, responses=ERRORS)
def models(principal: TenantDep, store: StoreDep, rt: RuntimeDep) -> ModelList:
    """The bare model as `default` (unless turned off), then the tasks this tenant may use (its own and public)."""
    base = [_base_card(rt)] if rt.settings.serve_base_model else []
    return ModelList(data=base + [ModelCard(id=r.id, created=created_epoch(r), owned_by=r.tenant or OPEN_TENANT)
                                  for r in list_visible(store, principal)])


@router.get("/models/{model}", response_model=ModelCard, responses=ERRORS)
def model(model: str, principal: TenantDep, store: StoreDep, rt: RuntimeDep) -> ModelCard:
    served = resolve(rt, store, principal, model)
    if served.record is None:
        return _base_card(rt)
    r = served.record
    return ModelCard(id=model, created=created_epoch(r), owned_by=r.tenant or OPEN_TENANT)


@router.post("/completions", response_model=CompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}})
async def completions(body: CompletionRequest, request: Request, principal: TenantDep, store: StoreDep,
                      engine: EngineDep, rt: RuntimeDep):
    """Each prompt is one input to the task named by `model`; `n` choices per prompt, in order."""
    served = resolve(rt, store, principal, body.model)
    texts, ids = _prompt_inputs(body.prompt)
    prompts = len(texts)
    # choice index = prompt index * n + choice of that prompt, as OpenAI orders them
    texts, ids = [t for t in texts for _ in range(body.n)], [i for i in ids for _ in range(body.n)]
    if len(texts) > MAX_BATCH_INPUTS:
        raise ApiError(422, "invalid_request", f"{prompts} prompts x n={body.n} make {len(texts)} choices; "
                                               f"the limit is {MAX_BATCH_INPUTS}")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(422, "invalid_request", "body.max_tokens: 0 generates nothing; it is allowed with echo, to "
                                               "score the prompt")
    score = body.max_tokens == 0
    params = sampling(served.generation, max_new_tokens=1 if score else body.max_tokens,
                      temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop,
                      cap=rt.settings.max_new_tokens, server=COMPLETIONS_DEFAULTS, **_output_fields(body))
    await precompile(engine, params)
    job = Job.start(rt, engine, principal, served.prompt, texts, "score" if score else "generate",
                    choice_params(params, body.n) * prompts, "cmpl", input_ids=ids, echo=body.echo,
                    logprobs=body.logprobs, share_prompt=body.n > 1)
    # what echo puts in front of the completion: the prompt as sent (token ids: their text, specials kept)
    echoes = [(engine.decode_ids(i) if i is not None else t) if body.echo else "" for t, i in zip(texts, ids)]
    listing = LogprobListing(engine) if body.logprobs is not None else None
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(job, _completion_chunks(job, body.model, created, include_usage, echoes, listing,
                                                    body.n), _data)
    outs = [check_output(o) for o in await job.results(request)]
    choices = []
    for i, (o, echo) in enumerate(zip(outs, echoes)):
        lps = None
        if listing is not None:
            lps = listing.completion(o.prompt_logprobs or [], 0, o.logprobs or [], len(echo))
        choices.append(CompletionChoice(index=i, text=echo + o.text, logprobs=lps, finish_reason=_finish(o)))
    return CompletionResponse(id=job.id, created=created, model=body.model, usage=_usage(outs, body.n),
                              choices=choices)


def _prompt_inputs(prompt) -> tuple[list[str], list[list[int] | None]]:
    """OpenAI's four prompt forms as (texts, token ids) per input: a string, strings, ids, or lists of ids."""
    if isinstance(prompt, str):
        return [prompt], [None]
    if prompt and isinstance(prompt[0], int):
        return [""], [list(prompt)]
    if prompt and isinstance(prompt[0], list):
        return [""] * len(prompt), [list(p) for p in prompt]
    return list(prompt), [None] * len(prompt)


class LogprobListing:
    """Token log-probabilities in OpenAI's two layouts (completions, chat), with token texts from the tokenizer."""

    def __init__(self, engine):
        self.engine = engine

    def _strings(self, entries: list[TokenLogprob]) -> dict[int, str]:
        ids = {e.token for e in entries} | {t for e in entries for t, _ in e.top}
        ids = sorted(ids)
        return dict(zip(ids, self.engine.token_strings(ids)))

    def completion(self, entries: list[TokenLogprob], offset: int, more: list[TokenLogprob] = (),
                   more_offset: int = 0) -> CompletionLogprobs:
        """One entry per token; text_offset counts on from `offset` through the token texts. `more` (the
        completion's tokens after an echoed prompt's) counts on from `more_offset`, where the prompt's text ends."""
        names = self._strings([*entries, *more])
        tokens, lps, tops, offsets = [], [], [], []
        for k, e in enumerate([*entries, *more]):
            if k == len(entries):
                offset = more_offset
            name = names[e.token]
            tokens.append(name)
            lps.append(e.logprob)
            if e.logprob is None:
                tops.append(None)
            else:
                top = {names[t]: lp for t, lp in e.top}
                top.setdefault(name, e.logprob)  # OpenAI: the N most likely, and the chosen token
                tops.append(top)
            offsets.append(offset)
            offset += len(name)
        return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    def chat(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        names = self._strings(entries)

        def item(token: int, lp: float) -> dict:
            name = names[token]
            return {"token": name, "logprob": lp, "bytes": None if "\ufffd" in name else list(name.encode())}

        return ChatLogprobs(content=[ChatTokenLogprob(**item(e.token, e.logprob),
                                                      top_logprobs=[TopLogprob(**item(t, lp)) for t, lp in e.top])
                                     for e in entries])


async def _completion_chunks(job: Job, model: str, created: int, include_usage: bool, echoes: list[str],
                             listing: LogprobListing | None, n: int = 1) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict], usage: CompletionUsage | None = None) -> bytes:
        body = {"id": job.id, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage.model_dump()
        return _data(body)

    started = [False] * len(echoes)
    offsets = [0] * len(echoes)
    async for i, out in job.events():
        if out.finished and out.finish_reason == "error":
            raise ApiError(500, "engine_error", out.error or "the request failed in the engine")
        text, prompt_entries = out.new_text, []
        if not started[i]:  # the echoed prompt leads the first chunk of its choice
            started[i] = True
            text = echoes[i] + text
            prompt_entries = out.prompt_logprobs or []
            offsets[i] = len(echoes[i])
        lps = None
        if listing is not None and (prompt_entries or out.new_logprobs):
            lps = listing.completion(prompt_entries, 0, out.new_logprobs, offsets[i])
            if out.new_logprobs:
                offsets[i] = lps.text_offset[-1] + len(lps.tokens[-1])
        if text or lps is not None or out.finished:
            yield chunk([{"index": i, "text": text,
                          "logprobs": lps.model_dump() if lps is not None else None,
                          "finish_reason": _finish(out) if out.finished else None}])
    if include_usage:
        yield chunk([], _usage([f for f in job.finals if f is not None], n))
    yield _data("[DONE]")


def chat_special_tokens(tokenizer) -> list[str]:
    """The special tokens the model's chat template writes (e.g. <|im_start|>): a template holding one is a chat."""
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    return [t for t in tokenizer.all_special_tokens if t and t in chat_template]


def _render(tokenizer, messages: list[dict]) -> str:
    """The model's own chat template, ending with the assistant's turn (a plain transcript without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - templates raise on role orders they do not support
        raise ApiError(422, "invalid_request", f"messages do not fit the model's chat template: {e}") from None


def chat_prompt(tokenizer, served: Served, body: ChatCompletionRequest, model: str) -> tuple[PromptRef, str]:
    """(prompt, input) for a chat with `served`; see the module docstring and docs/api.md."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    spec = served.prompt.spec
    template = spec.template
    own_format = spec.kind is not PromptKind.HARD or any(t in template for t in chat_special_tokens(tokenizer))
    if own_format:  # the task's prompt is what it was made with: the user's message is its input, as in generate
        if len(messages) != 1 or messages[0]["role"] != "user":
            why = ("its soft prompt was trained on its own input format" if spec.kind is not PromptKind.HARD
                   else "its template is already a chat prompt")
            raise ApiError(422, "invalid_request",
                           f"task {model!r} takes exactly one user message ({why}, so system messages and earlier "
                           f"turns have nowhere to go); send one, or chat with model {BASE_MODEL_ID!r} or a task "
                           f"whose template is {INPUT_SLOT}")
        return served.prompt, messages[0]["content"]
    if messages[-1]["role"] != "user":
        raise ApiError(422, "invalid_request", "the last message must be the user's: the model answers it")
    # a plain hard template: it frames the user's last message, and the model's chat template the conversation
    messages[-1]["content"] = template.replace(INPUT_SLOT, messages[-1]["content"])
    return BASE_PROMPT, _render(tokenizer, messages)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}})
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: TenantDep, store: StoreDep,
                           engine: EngineDep, rt: RuntimeDep):
    """Chat with a task or the bare model; what the model sees depends on the task (docs/api.md)."""
    served = resolve(rt, store, principal, body.model)
    prompt, text = chat_prompt(engine.tokenizer, served, body, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "invalid_request", "body.top_logprobs: needs logprobs to be true")
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling(served.generation, max_new_tokens=body.max_completion_tokens or body.max_tokens,
                      temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop,
                      cap=rt.settings.max_new_tokens, server=CHAT_DEFAULTS, **_output_fields(body))
    await precompile(engine, params)
    job = Job.start(rt, engine, principal, prompt, [text] * body.n, "generate", choice_params(params, body.n),
                    "chatcmpl", logprobs=top_n, share_prompt=body.n > 1)
    listing = LogprobListing(engine) if top_n is not None else None
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(job, _chat_chunks(job, body.model, created, include_usage, listing, body.n), _data)
    outs = [check_output(o) for o in await job.results(request)]
    return ChatCompletionResponse(id=job.id, created=created, model=body.model, usage=_usage(outs, body.n), choices=[
        ChatChoice(index=i, message=AssistantMessage(content=o.text), finish_reason=_finish(o),
                   logprobs=listing.chat(o.logprobs or []) if listing is not None else None)
        for i, o in enumerate(outs)])


async def _chat_chunks(job: Job, model: str, created: int, include_usage: bool,
                       listing: LogprobListing | None, n: int = 1) -> AsyncIterator[bytes]:
    def chunk(delta: ChatDelta | None, finish: str | None = None, usage: CompletionUsage | None = None,
              logprobs: ChatLogprobs | None = None, index: int = 0) -> bytes:
        choices = [] if delta is None else [ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                                            finish_reason=finish)]
        return _data(ChatCompletionChunk(id=job.id, created=created, model=model, choices=choices, usage=usage)
                     .model_dump(exclude_none=True))

    for i in range(len(job.streams)):  # one choice per stream (n)
        yield chunk(ChatDelta(role="assistant", content=""), index=i)
    async for i, out in job.events():
        if out.finished and out.finish_reason == "error":
            raise ApiError(500, "engine_error", out.error or "the request failed in the engine")
        lps = listing.chat(out.new_logprobs) if listing is not None and out.new_logprobs else None
        if out.new_text or lps is not None:
            yield chunk(ChatDelta(content=out.new_text), logprobs=lps, index=i)
        if out.finished:
            yield chunk(ChatDelta(), _finish(out), index=i)
    if include_usage:
        yield chunk(None, usage=_usage([f for f in job.finals if f is not None], n))
    yield _data("[DONE]")
