"""OpenAI's protocol beside its routes (routes/openai.py): what `model` names, the chat prompt, log-probability
listings, usage, and the response bodies and stream chunks of completions and chat completions.

`model` is a task id (or id@version), or `default`: the bare model, no task prompt. Completions put the prompt into
the task's template, after its virtual tokens, exactly as the native generate does. Chat depends on the task
(docs/api.md, "Chat and tasks"): a task with a format of its own (a soft prompt, or a template that is already a
chat prompt) gets the last user message as its input, so chat equals generate; a plain hard template wraps the
last user message, and the model's chat template wraps the conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

from prompt_core.spec import INPUT_SLOT, PromptKind, PromptSpec
from server.engine.request import PromptRef, RequestOutput, TokenLogprob

from .access import find_visible, prompt_ref
from .errors import ApiError
from .schemas import (
    BASE_MODEL_ID,
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
    ModelCard,
    OpenAIBase,
    TopLogprob,
)
from .serving import EngineCall, check_output
from .sse import sse

BASE_MODEL_OWNER = "promptserve"  # the server owns it, not a tenant
BASE_PROMPT = PromptRef(key=BASE_MODEL_ID, spec=PromptSpec(PromptKind.HARD, 0, INPUT_SLOT))


# ---- what `model` names

@dataclass(frozen=True)
class Served:
    """What a `model` names: a task version, or the bare model (record None)."""
    prompt: PromptRef
    generation: dict
    record: object = None


def resolve(rt, store, principal, model: str) -> Served:
    """The bare model for `default` (unless turned off), else a visible task (404 like any unknown task)."""
    if model == BASE_MODEL_ID and rt.settings.serve_base_model:
        return Served(BASE_PROMPT, {})
    record = find_visible(store, principal, model)
    return Served(prompt_ref(store, record), dict(record.generation), record)


def base_card(rt) -> ModelCard:
    return ModelCard(id=BASE_MODEL_ID, created=int(rt.started_at), owned_by=BASE_MODEL_OWNER)


# ---- completions in

def completion_inputs(body: CompletionRequest) -> tuple[list[str], list[list[int] | None]]:
    """(texts, token ids) per choice: OpenAI's four prompt forms (a string, strings, ids, or lists of ids), each
    prompt repeated n times (choice index = prompt index * n + choice of that prompt, as OpenAI orders them)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        texts, ids = [prompt], [None]
    elif prompt and isinstance(prompt[0], int):
        texts, ids = [""], [list(prompt)]
    elif prompt and isinstance(prompt[0], list):
        texts, ids = [""] * len(prompt), [list(p) for p in prompt]
    else:
        texts, ids = list(prompt), [None] * len(prompt)
    prompts = len(texts)
    texts, ids = [t for t in texts for _ in range(body.n)], [i for i in ids for _ in range(body.n)]
    if len(texts) > MAX_BATCH_INPUTS:
        raise ApiError(422, "invalid_request", f"{prompts} prompts x n={body.n} make {len(texts)} choices; "
                                               f"the limit is {MAX_BATCH_INPUTS}")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(422, "invalid_request", "body.max_tokens: 0 generates nothing; it is allowed with echo, to "
                                               "score the prompt")
    return texts, ids


# ---- chat in

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


def chat_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """Alternatives per token to list (0: only the chosen token's), or None for no log-probabilities."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "invalid_request", "body.top_logprobs: needs logprobs to be true")
    return (body.top_logprobs or 0) if body.logprobs else None


# ---- out: usage, finish reasons, log-probabilities

def usage(outs: list[RequestOutput], n: int = 1) -> CompletionUsage:
    """Like OpenAI, a prompt's tokens count once however many choices (n) it has."""
    p = sum(o.prompt_tokens for o in outs[::n])
    c = sum(o.completion_tokens for o in outs)
    return CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def finish(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def include_usage(body: OpenAIBase) -> bool:
    """stream_options.include_usage: a last chunk with the usage and no choices."""
    return bool(body.stream_options and body.stream_options.include_usage)


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


# ---- completions out

def completion_response(call: EngineCall, body: CompletionRequest, created: int, outs: list[RequestOutput],
                        echoes: list[str], listing: LogprobListing | None) -> CompletionResponse:
    choices = []
    for i, (o, echo) in enumerate(zip(outs, echoes)):
        lps = None
        if listing is not None:
            lps = listing.completion(o.prompt_logprobs or [], 0, o.logprobs or [], len(echo))
        choices.append(CompletionChoice(index=i, text=echo + o.text, logprobs=lps, finish_reason=finish(o)))
    return CompletionResponse(id=call.id, created=created, model=body.model, usage=usage(outs, body.n),
                              choices=choices)


async def completion_chunks(call: EngineCall, body: CompletionRequest, created: int, echoes: list[str],
                            listing: LogprobListing | None) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict], used: CompletionUsage | None = None) -> bytes:
        out = {"id": call.id, "object": "text_completion", "created": created, "model": body.model,
               "choices": choices}
        if used is not None:
            out["usage"] = used.model_dump()
        return sse(out)

    started = [False] * len(echoes)
    offsets = [0] * len(echoes)
    async for i, out in call.events():
        check_output(out)
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
                          "finish_reason": finish(out) if out.finished else None}])
    if include_usage(body):
        yield chunk([], usage([f for f in call.finals if f is not None], body.n))
    yield sse("[DONE]")


# ---- chat out

def chat_response(call: EngineCall, body: ChatCompletionRequest, created: int, outs: list[RequestOutput],
                  listing: LogprobListing | None) -> ChatCompletionResponse:
    return ChatCompletionResponse(id=call.id, created=created, model=body.model, usage=usage(outs, body.n), choices=[
        ChatChoice(index=i, message=AssistantMessage(content=o.text), finish_reason=finish(o),
                   logprobs=listing.chat(o.logprobs or []) if listing is not None else None)
        for i, o in enumerate(outs)])


async def chat_chunks(call: EngineCall, body: ChatCompletionRequest, created: int,
                      listing: LogprobListing | None) -> AsyncIterator[bytes]:
    def chunk(delta: ChatDelta | None, finish_reason: str | None = None, used: CompletionUsage | None = None,
              logprobs: ChatLogprobs | None = None, index: int = 0) -> bytes:
        choices = [] if delta is None else [ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                                            finish_reason=finish_reason)]
        return sse(ChatCompletionChunk(id=call.id, created=created, model=body.model, choices=choices, usage=used)
                   .model_dump(exclude_none=True))

    for i in range(len(call.streams)):  # one choice per stream (n)
        yield chunk(ChatDelta(role="assistant", content=""), index=i)
    async for i, out in call.events():
        check_output(out)
        lps = listing.chat(out.new_logprobs) if listing is not None and out.new_logprobs else None
        if out.new_text or lps is not None:
            yield chunk(ChatDelta(content=out.new_text), logprobs=lps, index=i)
        if out.finished:
            yield chunk(ChatDelta(), finish(out), index=i)
    if include_usage(body):
        yield chunk(None, used=usage([f for f in call.finals if f is not None], body.n))
    yield sse("[DONE]")
