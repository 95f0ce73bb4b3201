"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator

from models.api import Finished
from models.weights.dtypes import FIT, accepted_names, normalize_dtype, split_kv

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def json_number(value: object) -> object:
    """Numbers as JSON means them: 2.0 is an integer, but true and "2" are not numbers."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be a JSON number")
    return value


def numbers_only(*fields: str) -> classmethod:
    """A before-validator for numeric fields: pydantic's lax mode would take booleans and strings."""
    return field_validator(*fields, mode="before")(classmethod(lambda cls, v: json_number(v)))


MAX_STOP_STRINGS = 8
StopString = Annotated[str, Field(min_length=1, max_length=256)]
# One string or a list, as OpenAI takes it; validated values are a tuple.
StopStrings = Annotated[StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)],
                        AfterValidator(lambda v: (v,) if isinstance(v, str) else tuple(v))]


# The precision names and documented aliases, as an enum in the schema; validated values are canonical.
Dtype = Annotated[Literal[accepted_names()], AfterValidator(normalize_dtype)]  # type: ignore[misc]
# The report (server/routes/report.py) measures named precisions: any but `fit`, each with an optional KV cache
# precision (`q4+kv8`)
ReportDtype = Annotated[Literal[tuple(n for n in accepted_names() if split_kv(n)[0] != FIT)],  # type: ignore[misc]
                        AfterValidator(normalize_dtype)]
DTYPE_HELP = ("precision: auto (the checkpoint's), float32, float16, bfloat16, q8..q2 (q4g32: group size), "
              "mxfp8, mxfp4, nvfp4, mixed_3_6..., fit; q4:float16 sets the float dtype of the rest")
SEED_LIMIT = 2**53  # exactly representable in JSON numbers everywhere
CacheSalt = Annotated[str | None, Field(None, min_length=1, max_length=256, description=(
    "requests reuse cached prompt prefixes only with requests of the same API key and the same salt"))]


class GenerateRequest(BaseModel):
    model_config = _STRICT

    prompt: str = Field(min_length=1, max_length=1_000_000, description="text to continue")
    model: str | None = Field(None, min_length=1, max_length=256,
                              description="a name from GET /models; default: the startup model")
    dtype: Dtype | None = Field(None, description=DTYPE_HELP)
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=SEED_LIMIT)
    stop: StopStrings | None = Field(None, description="stop strings, not included in the text")
    stream: StrictBool = Field(False, description="server-sent events when true")
    ignore_eos: StrictBool = Field(False, description="keep generating past end-of-sequence, up to max_tokens")
    cache_salt: CacheSalt

    _numbers = numbers_only("max_tokens", "temperature", "top_p", "seed")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV cache was reused from an earlier request")


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Timings(BaseModel):
    time_to_first_token_s: float
    total_s: float
    tokens_per_second: float = Field(description="decode rate after the first token")


class GenerateResponse(BaseModel):
    text: str
    model: str
    dtype: str = Field(description="the variant's precision")
    float_dtype: str = Field(description="the dtype of its unquantized parameters")
    finish_reason: Literal["stop", "length"]
    usage: UsageBody
    timings: Timings
    warnings: list[str] = Field(default_factory=list, description="e.g. non-finite logits at this dtype")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    status: int


class ErrorBody(BaseModel):
    error: ErrorDetail


# Every route may answer with these; documented so clients and schema checks know the shape.
ERROR_RESPONSES: dict = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 422, 429, 500, 503, 507)}
# Streaming endpoints answer 200 with server-sent events when the body asks for `stream`.
STREAM_RESPONSE: dict = {200: {"content": {"text/event-stream": {"schema": {}}},
                               "description": "JSON, or server-sent events when stream is true"}}


def usage_body(done: Finished) -> dict:
    """Token counts in the OpenAI shape, for both APIs."""
    return {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens,
            "total_tokens": done.usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": done.usage.cached_tokens}}
