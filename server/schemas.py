"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
)

from models.dtypes import normalize_dtype

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


# A JSON number: ints and floats, but never true/false or a numeric string.
Number = Annotated[StrictFloat | StrictInt, BeforeValidator(_no_bool), AfterValidator(float)]


def canonical_dtype(value: object) -> str | None:
    return None if value is None else normalize_dtype(value)


class GenerateRequest(BaseModel):
    model_config = _STRICT

    prompt: str = Field(min_length=1, max_length=1_000_000, description="text to continue")
    model: str | None = Field(None, min_length=1, max_length=256,
                              description="a name from GET /models; default: the startup model")
    dtype: str | None = Field(None, description="auto, float32, float16, bfloat16 (or fp16, bf16, half, fp32, float)")
    max_tokens: StrictInt | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: Number = Field(0.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, description="stop strings, not included in the text")
    stream: StrictBool = Field(False, description="server-sent events when true")
    ignore_eos: StrictBool = Field(False, description="keep generating past end-of-sequence, up to max_tokens")

    _normalize_dtype = field_validator("dtype", mode="before")(classmethod(lambda cls, v: canonical_dtype(v)))

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    time_to_first_token_s: float
    total_s: float
    tokens_per_second: float = Field(description="decode rate after the first token")


class GenerateResponse(BaseModel):
    text: str
    model: str
    dtype: str
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
