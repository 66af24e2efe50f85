"""The OpenAI-compatible routes (completions, chat completions, models) in OpenAI's field names, so its clients
work unchanged; vLLM's extensions are understood rather than silently ignored."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.request import InvalidRequest, SamplingParams

from .common import (
    MAX_BATCH_INPUTS,
    MAX_CHOICES,
    MAX_INPUT_CHARS,
    MAX_N,
    MAX_PATTERN_CHARS,
    MAX_STOP,
    Input,
    LogitBias,
    Penalty,
    ResponseFormat,
    StopStr,
)
from .sampling import CHAT, COMPLETIONS, Asked

BASE_MODEL_ID = "default"     # `model` naming the bare model, no task prompt (--serve-base-model)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIBase(BaseModel):
    """OpenAI clients send fields we do not use (user, ...): ignore those, but refuse what would change the output."""
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, description="a task id, or id@version")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False,
                                      description="0 is greedy; default: the task's, else 1")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="default: the task's, else 1")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopStr | list[StopStr] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt (with a seed, choice i uses seed + i)")
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = Field(None, description="default: the task's, else free text")
    min_tokens: int = Field(0, ge=0, description="vLLM's: no end-of-sequence token, and no stop string, before this "
                                                 "many tokens")
    ignore_eos: bool = Field(False, description="vLLM's: an end-of-sequence token does not end the text")
    # vLLM's names for the same constraints, so vLLM clients are understood rather than silently ignored
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1,
                                                                           max_length=MAX_CHOICES)
    guided_grammar: Any = Field(None, description="not supported: only null")
    structured_outputs: Any = Field(None, description="not supported: only null (use response_format)")

    @field_validator("guided_grammar", "structured_outputs")
    @classmethod
    def _unsupported(cls, v: Any, info) -> Any:
        if v is not None:
            raise ValueError(f"{info.field_name} is not supported; use response_format (json_schema, regex or "
                             f"choice)")
        return v

    def output_format(self) -> ResponseFormat | None:
        """response_format, or vLLM's guided_json / guided_regex / guided_choice: at most one of them."""
        given = [k for k in ("response_format", "guided_json", "guided_regex", "guided_choice")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise InvalidRequest(f"give at most one output constraint; found {given}")
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except (ValueError, RecursionError) as e:
                    why = e if isinstance(e, ValueError) else "nested too deeply"
                    raise InvalidRequest(f"guided_json is not JSON: {why}") from None
                if not isinstance(schema, dict):
                    raise InvalidRequest("guided_json must be a JSON schema object")
            return ResponseFormat(type="json_schema", json_schema={"schema": schema})
        if self.guided_regex is not None:
            return ResponseFormat(type="regex", regex=self.guided_regex)
        if self.guided_choice is not None:
            return ResponseFormat(type="choice", choice=self.guided_choice)
        return self.response_format

    def asked(self, max_new_tokens: int | None) -> Asked:
        """The sampling fields every OpenAI route passes on (top_k is not OpenAI's: the task's, else none)."""
        return Asked(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                     stop=self.stop, logit_bias=self.logit_bias, presence_penalty=self.presence_penalty,
                     frequency_penalty=self.frequency_penalty, response_format=self.output_format(),
                     min_tokens=self.min_tokens, ignore_eos=self.ignore_eos)


TokenId = Annotated[int, Field(ge=0, lt=2**31)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_INPUT_CHARS)]


class CompletionRequest(OpenAIBase):
    prompt: (Input | Annotated[list[Input], Field(min_length=1, max_length=MAX_BATCH_INPUTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_BATCH_INPUTS)]) = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists; each is one "
                    "input to the task, placed in its template where {input} is")
    max_tokens: int | None = Field(None, ge=0, description="default: the task's max_new_tokens, else 16; 0 (with "
                                                           "echo) scores the prompt without generating")
    echo: bool = Field(False, description="return the prompt, and with logprobs its tokens' log-probabilities, "
                                          "before the completion")
    logprobs: int | None = Field(None, ge=0, description="each token's log-probability and the N most likely "
                                                         "alternatives (at most --max-logprobs)")
    best_of: int | None = Field(None, ge=1, description="not supported beyond n: only null or n")

    def to_sampling(self, task: dict, cap: int | None) -> SamplingParams:
        """Over the task's generation defaults and OpenAI's (16 tokens, temperature 1); max_tokens 0 (echo: score
        the prompt) computes one token that nobody sees."""
        return self.asked(1 if self.max_tokens == 0 else self.max_tokens).over(task, COMPLETIONS, cap)

    @model_validator(mode="after")
    def _best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_none(cls, v: Any) -> Any:
        return None if v is False else v

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_form(cls, v: Any) -> Any:
        """One clear message for a list that mixes forms, instead of one per union branch."""
        if isinstance(v, list) and v:
            kinds = {"token id" if isinstance(x, int) and not isinstance(x, bool) else
                     "string" if isinstance(x, str) else "list" if isinstance(x, list) else "other" for x in v}
            if len(kinds) > 1 or "other" in kinds:
                raise ValueError("a prompt list holds strings, token ids or lists of token ids, one form only; "
                                 f"found {', '.join(sorted(kinds))}")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_INPUT_CHARS)] | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, description="with logprobs: the N most likely alternatives per "
                                                             "token (at most --max-logprobs)")

    def to_sampling(self, task: dict, cap: int | None) -> SamplingParams:
        """Over the task's generation defaults and the chat route's (64 tokens, temperature 1)."""
        return self.asked(self.max_completion_tokens or self.max_tokens).over(task, CHAT, cap)


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """OpenAI's completions layout, one entry per token of `text` (the prompt's first with echo). A token that
    nothing precedes has null `token_logprobs` and `top_logprobs`; `top_logprobs` maps the N most likely tokens,
    and the token itself, to their log-probabilities; `text_offset` is where the token starts in `text`."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
