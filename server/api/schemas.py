"""Wire schemas, one per direction (requests in, responses out). Pydantic only: no torch, no engine imports.

Limits that protect the server (list lengths, string sizes) live here so a hostile body fails validation (422)
before it costs any tokenization. Limits that depend on settings (max_new_tokens) are checked by the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_INPUT_CHARS = 1_000_000   # the engine bounds tokens; this bounds memory before tokenizing
MAX_BATCH_INPUTS = 64         # inputs of one classify / completions call
MAX_STOP = 16
MAX_STOP_CHARS = 256

Input = Annotated[str, Field(max_length=MAX_INPUT_CHARS)]
StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class Strict(BaseModel):
    """Our native bodies reject unknown fields, so a typo ("max_tokens" for "max_new_tokens") is a 422, not ignored."""
    model_config = ConfigDict(extra="forbid")


# ---- errors

class ErrorBody(BaseModel):
    type: str = Field(description="machine-readable kind: invalid_request, not_found, rate_limited, ...")
    message: str = Field(description="what was wrong, for a human")


class ErrorResponse(BaseModel):
    """The one shape of every failure."""
    error: ErrorBody


# ---- tasks

Visibility = Literal["private", "public"]
TaskType = Literal["generate", "classify"]
Labels = list[Annotated[str, Field(min_length=1, max_length=128)]] | dict[str, Annotated[str, Field(min_length=1)]]


class GenerationDefaults(Strict):
    """A task's defaults for generate requests that leave these fields out."""
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, lt=2**63)
    stop: list[StopStr] | None = Field(None, max_length=MAX_STOP)


class TaskMetadata(Strict):
    """The optional `metadata` part of an upload (JSON text). Fields left out come from the adapter, if it has them."""
    task_type: TaskType | None = None
    labels: Labels | None = Field(None, max_length=256)
    template: str | None = Field(None, max_length=20_000, description="must hold exactly one {input}")
    description: str | None = Field(None, max_length=4_000)
    visibility: Visibility | None = None
    generation: GenerationDefaults | None = None


class HardTaskCreate(Strict):
    """JSON body of POST /v1/tasks for a hard prompt (no tensors)."""
    task_id: str = Field(min_length=1, max_length=128, examples=["sentiment"])
    kind: Literal["hard"] = "hard"
    template: str = Field(max_length=20_000, examples=["Review: {input}\nSentiment:"])
    task_type: TaskType | None = None
    labels: Labels | None = Field(None, max_length=256)
    description: str = Field("", max_length=4_000)
    visibility: Visibility = "private"
    generation: GenerationDefaults | None = None


class LabelPublic(BaseModel):
    name: str
    verbalizer: str


class TaskPublic(BaseModel):
    """A task version as clients see it."""
    id: str
    version: int
    kind: str
    num_virtual_tokens: int
    sha256: str | None = Field(description="sha256 of the tensor file; null for hard prompts")
    task_type: TaskType
    labels: list[LabelPublic]
    template: str
    description: str
    visibility: Visibility
    owner: str
    generation: dict[str, Any]
    created_at: str


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskPublic]


# ---- native generate / classify

class SamplingFields(Strict):
    max_new_tokens: int | None = Field(None, ge=1, description="default: the task's, else 64 (or the server's cap if lower)")
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="0 is greedy (the default)")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, lt=2**63, description="0 disables it; above the vocabulary it does nothing")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed gives the same text")
    stop: StopStr | list[StopStr] | None = Field(None, max_length=MAX_STOP)


class GenerateRequest(SamplingFields):
    input: Input
    stream: bool = Field(False, description="Server-Sent Events: one `token` event per token, then `done`")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    task: str = Field(description="the task version that served it, id@version")
    text: str
    finish_reason: Literal["stop", "length", "cancelled", "error"]
    usage: Usage


class TokenEvent(BaseModel):
    """`event: token` of a generate stream."""
    index: int
    id: int | None = Field(description="token id; null on an event that only flushes text held back at the end")
    text: str = Field(description="text this token completes; may be empty while a character is split")


class ClassifyRequest(Strict):
    input: Input | Annotated[list[Input], Field(min_length=1, max_length=MAX_BATCH_INPUTS)]


class ClassifyResult(BaseModel):
    label: str
    scores: dict[str, float]


# ---- OpenAI-compatible

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
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float = Field(0.0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, description="not supported: only 0")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float, info) -> float:
        if v != 0:
            raise ValueError(f"{info.field_name} is not supported: only 0")
        return v


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


# ---- ops

class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready", "draining"]
    model: str | None = None
    tasks: int | None = None
    detail: str | None = None
