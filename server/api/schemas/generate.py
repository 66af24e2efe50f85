"""The native generate and classify routes: sampling fields, requests, responses and stream events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from server.engine.request import RequestOutput, SamplingParams

from .common import MAX_BATCH_INPUTS, MAX_STOP, Input, LogitBias, Penalty, ResponseFormat, StopStr, Strict
from .sampling import NATIVE, Asked


class SamplingFields(Strict):
    max_new_tokens: int | None = Field(None, ge=1,
                                       description="default: the task's, else 64 (or the server's cap if lower)")
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="0 is greedy (the default)")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, lt=2**63, description="0 disables it; above the vocabulary it does nothing")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed gives the same text")
    stop: StopStr | list[StopStr] | None = Field(None, max_length=MAX_STOP)
    logit_bias: LogitBias | None = None
    presence_penalty: Penalty = Field(0.0, description="subtracted once from every token already generated")
    frequency_penalty: Penalty = Field(0.0, description="subtracted per occurrence of a token already generated")
    response_format: ResponseFormat | None = Field(None, description="default: the task's, else free text")
    min_tokens: int = Field(0, ge=0, description="no end-of-sequence token, and no stop string, before this many "
                                                 "tokens (at most max_new_tokens)")
    ignore_eos: bool = Field(False, description="an end-of-sequence token does not end the text (fixed length)")

    def to_sampling(self, task: dict, cap: int | None) -> SamplingParams:
        """These fields over the task's generation defaults (`task`) and the native route's (greedy, 64 tokens, at
        most `cap`: the server's --max-new-tokens)."""
        return Asked(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                     top_k=self.top_k, seed=self.seed, stop=self.stop, logit_bias=self.logit_bias,
                     presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                     response_format=self.response_format, min_tokens=self.min_tokens,
                     ignore_eos=self.ignore_eos).over(task, NATIVE, cap)


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

    @classmethod
    def of(cls, id: str, task: str, out: RequestOutput) -> "GenerateResponse":
        """The answer (or a stream's `done` event) for a finished output of task version `task`."""
        return cls(id=id, task=task, text=out.text, finish_reason=out.finish_reason,
                   usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens))


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

    @classmethod
    def of(cls, out: RequestOutput) -> "ClassifyResult":
        """Each label's probability, and the most likely label (the first of equals)."""
        scores = dict(zip(out.labels or [], out.label_probs or []))
        return cls(label=max(scores, key=scores.get), scores=scores)
