"""Requests as the engine sees them: what to run, with which prompt, and how to sample. No torch here."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from prompt_core.layout import RowPlan
from prompt_core.spec import PromptSpec, PromptTensors

from .block_manager import BlockTables


class EngineError(Exception):
    """Base of the errors the engine reports to callers."""


class InvalidRequest(EngineError, ValueError):
    """Bad input from a user (HTTP 422)."""


class InputTooLong(InvalidRequest):
    """The prompt plus the requested tokens do not fit the configured limits (HTTP 413)."""


class EngineOverloaded(EngineError):
    """The global queue is full (HTTP 503)."""


class EngineStopped(EngineError):
    """The engine is shutting down or its loop died (HTTP 503)."""


DEFAULT_MAX_NEW_TOKENS = 64  # a request that does not say (routes fall back to it too)

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice"]
CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "choice")


@dataclass(frozen=True)
class Constraint:
    """What every generated text must match. `value` is canonical text, so equal constraints share one compiled
    grammar: the JSON schema as compact JSON, the regex itself, the choices as a JSON list, "" for json_object.
    `strict` (json_schema): properties the schema does not name are refused unless it allows them explicitly."""
    kind: ConstraintKind
    value: str = ""
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidRequest(f"constraint type must be one of {list(CONSTRAINT_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding. temperature 0 means greedy; a seed makes sampling reproducible.

    logit_bias adds to a token's logit before sampling (OpenAI's -100..100: +100 all but forces the token, -100 bans
    it). presence_penalty and frequency_penalty (-2..2) lower the logit of every token already generated, by the
    penalty once and by the penalty per occurrence, as OpenAI specifies. A constraint limits every step to tokens
    that keep the text a valid prefix of its grammar, and end-of-sequence to where the grammar is complete."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    constraint: Constraint | None = None
    min_tokens: int = 0          # no end-of-sequence token, and no stop string, before this many tokens (vLLM's)
    ignore_eos: bool = False     # an end-of-sequence token does not end the request (vLLM's; fixed-length output)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.top_k < 2**63:
            raise InvalidRequest(f"top_k must be in [0, 2**63) (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed!r}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequest(f"min_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                                 f"got {self.min_tokens!r}")
        for tok, bias in self.logit_bias:
            if not isinstance(tok, int) or tok < 0:
                raise InvalidRequest(f"logit_bias keys must be token ids >= 0, got {tok!r}")
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bias!r} for token {tok}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or not -2 <= v <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {v!r}")
        if self.constraint is not None and (self.min_tokens or self.ignore_eos):
            raise InvalidRequest("min_tokens and ignore_eos cannot be combined with an output constraint: the "
                                 "grammar decides where the output may end")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class PromptRef:
    """A task prompt as the engine needs it. `load` returns device-ready tensors (None for a hard prompt); it is
    called at prefill only, since after prefill a row's virtual tokens and prefix live in its cache."""
    key: str  # unique per content, e.g. "sentiment@3"
    spec: PromptSpec
    load: Callable[[], PromptTensors | None] = lambda: None
    content: str = ""  # a digest of the stored tensors: cached key/value blocks are keyed by it as well as by key


Mode = Literal["generate", "classify", "score"]
Priority = Literal["interactive", "batch"]


@dataclass
class EngineRequest:
    """One input to a task. `mode`: generate (sample tokens), classify (score every label), or score (the prompt's
    own log-probabilities only, finished at prefill; needs `echo`).

    input_ids: token ids given instead of `text`; they go where the template's `{input}` is, like text would.
    echo: also return the log-probability of each input token given everything before it (virtual tokens and
      the template's text before the input are context). The input is then tokenized apart from the template
      text, so that its tokens are the client's own.
    logprobs: None for none; N >= 0 for each token's log-probability and the N most likely alternatives.
    """
    request_id: str
    prompt: PromptRef
    text: str
    mode: Mode = "generate"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = "default"
    # one of several choices (OpenAI's n) of the same prompt: its whole prompt but the last token is prefilled once
    # for all of them (through the head cache), and each choice computes only its last prompt token
    share_prompt: bool = False
    input_ids: tuple[int, ...] | None = None
    echo: bool = False
    logprobs: int | None = None
    # batch work (the Batch API) runs from capacity interactive requests leave: admitted after them, preempted first
    priority: Priority = "interactive"

    @property
    def top_n(self) -> int:
        """Alternatives returned per token (0 when logprobs are off or only the token's own is asked for)."""
        return self.logprobs or 0


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the model (raw logits, before temperature or top-k/top-p), with the
    `top_n` most likely tokens at that position. logprob is None for a first token that nothing precedes."""
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's queues compare sequences by who they are
class Sequence:
    """Engine state of one request."""
    request: EngineRequest
    plan: RowPlan
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None       # "stop", "length", "cancelled", "error"
    error: str | None = None
    label_scores: list[float] | None = None
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    cancelled: bool = False
    seed: int = 0                          # the sampling seed in use (drawn at random when none was given)
    head_len: int = 0                      # leading tokens that are the same for every request of the task
    matcher: object | None = None          # grammar state of a constrained request (see engine/constraints.py)
    prompt_logprobs: list[TokenLogprob] | None = None  # the input's tokens, with echo (set at prefill)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per sampled token (EOS included)
    sent_logprobs: int = 0                 # output_logprobs already handed out in a RequestOutput
    prompt_sent: bool = False              # prompt_logprobs went out with an earlier output
    prompt_lp_done: bool = False           # every input token's log-probability is in prompt_logprobs
    # incremental detokenization offsets (see OutputProcessor._detokenize)
    prefix_offset: int = 0
    read_offset: int = 0
    # the key/value cache (scheduler and block manager): blocks held, queries whose key/values are computed
    blocks: BlockTables = field(default_factory=lambda: BlockTables([[]]))
    computed: int = 0
    prefix_written: bool = False           # its prefix-tuning key/values are in its blocks (until preempted)
    tensors: PromptTensors | None = None   # the loaded soft prompt, while its prefill runs
    preemptions: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def is_classify(self) -> bool:
        return self.request.mode == "classify"

    @property
    def samples(self) -> bool:
        """Whether the row generates tokens (classify and score rows finish at prefill)."""
        return self.request.mode == "generate"

    @property
    def prompt_tokens(self) -> int:
        """Every input token the model attends to: the template's and the input's, prompt tuning's and P-tuning's
        virtual tokens, and prefix tuning's virtual tokens (its prefix slots), so every kind counts alike toward
        input limits, token quotas and usage."""
        return self.plan.prefix + self.plan.num_tokens

    @property
    def num_queries(self) -> int:
        """Queries the sequence computes in all: its prompt (and label tokens), then each generated token but the
        last; once all but the last are computed, the last one's logits give the next token."""
        return self.plan.num_queries + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_queries - self.computed > 1

    @property
    def max_slots(self) -> int:
        """The most cache slots it can ever hold: prefix, prompt, label tokens and every generated token but the
        last (a classify or score request generates none)."""
        new = self.request.sampling.max_new_tokens - 1 if self.samples else 0
        return self.plan.prefix + self.plan.num_queries + max(new, 0)

    @property
    def prefill_plan(self) -> RowPlan:
        """The prompt, followed by what was generated before a preemption (recomputed on resume)."""
        if not self.output_ids:
            return self.plan
        p = self.plan
        return RowPlan(ids=p.ids + self.output_ids, virt=p.virt + [-1] * len(self.output_ids), prefix=p.prefix)

    @property
    def cost_tokens(self) -> int:
        """Queries the prefill computes: the prompt plus any label tokens, plus the output of a resumed sequence."""
        return self.plan.num_queries + len(self.output_ids)



@dataclass
class RequestOutput:
    """What one engine step produced for one request (a delta, plus the final state once finished)."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    labels: list[str] | None = None
    label_probs: list[float] | None = None
    error: str | None = None
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # with echo: on the first output and on the final one
    new_logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs: the tokens of this delta
    logprobs: list[TokenLogprob] | None = None  # with logprobs, on the final output: every sampled token
