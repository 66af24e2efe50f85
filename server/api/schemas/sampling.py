"""What a request's sampling fields mean to the engine: the one translation behind every body's `to_sampling`
(generate, completions, chat) and behind a task upload's check of its generation defaults.

Request fields win over the task's generation defaults, which win over the route's own defaults (greedy with 64
tokens natively, OpenAI's own on its routes); max_new_tokens never goes above the server's cap when the request
leaves it out (leaving a field out must never be refused). The task's response_format applies unless the request
sends its own ({"type": "text"} asks for free text). Refusals are the engine's InvalidRequest (a 422).
No torch: the engine's request types and constraint builders are plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine import constraints
from server.engine.request import DEFAULT_MAX_NEW_TOKENS, Constraint, InvalidRequest, SamplingParams

from .common import ResponseFormat

MAX_SCHEMA_CHARS = 100_000  # a JSON schema, as compact JSON


@dataclass(frozen=True)
class RouteDefaults:
    """What a route uses for a field that neither the request nor the task sets."""
    max_new_tokens: int
    temperature: float


NATIVE = RouteDefaults(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0)
COMPLETIONS = RouteDefaults(max_new_tokens=16, temperature=1.0)   # OpenAI's own defaults
CHAT = RouteDefaults(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=1.0)


@dataclass(frozen=True)
class Asked:
    """The sampling fields one request sets, in the engine's names; None leaves a field to the task or the route."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: ResponseFormat | None = None
    min_tokens: int = 0
    ignore_eos: bool = False

    def over(self, task: dict, route: RouteDefaults, cap: int | None) -> SamplingParams:
        """These fields over the task's generation defaults (`task`) over the route's, as SamplingParams."""
        def pick(value, name, fallback):
            return value if value is not None else task.get(name, fallback)

        stops = self.stop if self.stop is not None else task.get("stop") or ()
        if isinstance(stops, str):
            stops = (stops,)
        try:
            fallback = min(route.max_new_tokens, cap) if cap else route.max_new_tokens
            fmt = self.response_format if self.response_format is not None else task.get("response_format")
            return SamplingParams(max_new_tokens=int(self.max_new_tokens if self.max_new_tokens is not None
                                                     else task.get("max_new_tokens", fallback)),
                                  temperature=float(pick(self.temperature, "temperature", route.temperature)),
                                  top_p=float(pick(self.top_p, "top_p", 1.0)), top_k=int(pick(self.top_k, "top_k", 0)),
                                  seed=self.seed, stop=tuple(str(s) for s in stops),
                                  logit_bias=logit_bias_of(self.logit_bias),
                                  presence_penalty=float(self.presence_penalty),
                                  frequency_penalty=float(self.frequency_penalty), constraint=constraint_of(fmt),
                                  min_tokens=int(self.min_tokens), ignore_eos=bool(self.ignore_eos))
        except (TypeError, ValueError) as e:  # the task's stored defaults are not numbers: the user's to fix
            if isinstance(e, InvalidRequest):
                raise
            raise InvalidRequest(f"the task's generation defaults are invalid: {e}") from None


def constraint_of(fmt: ResponseFormat | dict | None) -> Constraint | None:
    """A response_format (the wire model, or its dict as a task stores it) as an engine constraint; None for text.
    Only the shape is checked here; whether the grammar library can compile it is checked by the engine."""
    if fmt is None:
        return None
    if isinstance(fmt, dict):
        try:
            fmt = ResponseFormat.model_validate(fmt)
        except ValueError as e:
            raise InvalidRequest(f"response_format is invalid: {e}") from None
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object")
    if fmt.type == "regex":
        return constraints.regex(fmt.regex)
    if fmt.type == "choice":
        return constraints.choice(fmt.choice)
    c = constraints.json_schema(fmt.json_schema.schema_, strict=fmt.json_schema.strict is not False)
    if len(c.value) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(f"the JSON schema has {len(c.value)} characters; the limit is {MAX_SCHEMA_CHARS}")
    return c


def logit_bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as sorted (id, bias) pairs; a key that is not a token id is a 422."""
    out = []
    for key, value in (bias or {}).items():
        if not key.strip().isdigit():
            raise InvalidRequest(f"logit_bias keys must be token ids (digits), got {key!r}")
        out.append((int(key), float(value)))
    return tuple(sorted(out))
