"""What every wire schema shares: the limits that protect the server, the strict base of native bodies, the one
error shape, and the fields several requests take (response_format, logit_bias, penalties).

Limits that protect the server (list lengths, string sizes) live here so a hostile body fails validation (422)
before it costs any tokenization. Limits that depend on settings (max_new_tokens) are checked by the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_INPUT_CHARS = 1_000_000   # the engine bounds tokens; this bounds memory before tokenizing
MAX_BATCH_INPUTS = 64         # inputs of one classify / completions call
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_N = 16                    # choices of one OpenAI request
MAX_LOGIT_BIAS = 1024         # entries of one logit_bias
MAX_CHOICES = 1024            # strings of one choice constraint
MAX_PATTERN_CHARS = 10_000    # a regex constraint

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


# ---- fields several requests share

class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field("output", max_length=64)
    description: str | None = Field(None, max_length=4_000)
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON schema (draft 2020-12 subset; see docs)")
    strict: bool | None = Field(None, description="true or null: properties the schema does not list are refused "
                                                  "unless it allows them explicitly; false: JSON Schema's defaults")


class ResponseFormat(BaseModel):
    """What the output must match. `text` is free text; `json_object` any JSON object; `json_schema` OpenAI's
    shape; `regex` and `choice` (exactly one of the strings) are this server's extensions of the same field."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema", "regex", "choice"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)
    choice: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS * 4)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _one_payload(self) -> "ResponseFormat":
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        needs = self.type if self.type in ("json_schema", "regex", "choice") else None
        if needs and needs not in given:
            raise ValueError(f"type {self.type!r} needs the field {self.type!r}")
        extra = [k for k in given if k != needs]
        if extra:
            raise ValueError(f"type {self.type!r} takes no {extra[0]!r} field")
        return self


LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]],
                      Field(max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias in [-100, 100]")]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
