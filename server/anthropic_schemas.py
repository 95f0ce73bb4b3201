"""Anthropic Messages API request bodies (POST /v1/messages, /v1/messages/count_tokens)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from server.schemas import Dtype, StopString, numbers_only
from server.tool_schemas import JsonSchema, ToolName

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
_BLOCK = ConfigDict(extra="ignore", allow_inf_nan=False)  # cache_control, citations: accepted, no effect
Text = Annotated[str, Field(max_length=1_000_000)]


class TextBlock(BaseModel):
    model_config = _BLOCK
    type: Literal["text"]
    text: Text


class ToolUseBlock(BaseModel):
    """A tool call the assistant made earlier, passed back as history."""

    model_config = _BLOCK
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1, max_length=256)]
    name: str = ToolName
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = _BLOCK
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: Text | Annotated[list[TextBlock], Field(max_length=1000)] | None = None
    is_error: StrictBool | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(b.text for b in self.content)
        return self.content or ""


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: Text | Annotated[list[ContentBlock], Field(max_length=1000)]


class Tool(BaseModel):
    model_config = _BLOCK
    type: Literal["custom"] | None = None
    name: str = ToolName
    description: str | None = Field(None, max_length=100_000)
    input_schema: JsonSchema


class ToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["auto", "none", "any", "tool"] = Field(description="`any` or `tool` (with `name`) is enforced "
                                                         "(the input validates)")
    name: str | None = Field(None, min_length=1, max_length=128, description="the tool, with type `tool`")
    disable_parallel_tool_use: StrictBool | None = None


class Metadata(BaseModel):
    model_config = _STRICT
    user_id: str | None = Field(None, max_length=256)


class CountTokensRequest(BaseModel):
    model_config = _STRICT

    model: str = Field(min_length=1, max_length=300, description="model id; `name:dtype` picks a dtype")
    messages: list[Message] = Field(min_length=1, max_length=1000)
    system: Text | Annotated[list[TextBlock], Field(max_length=1000)] | None = None
    tools: list[Tool] | None = Field(None, max_length=128, description="rendered through the chat template")
    tool_choice: ToolChoice | None = None

    def system_text(self) -> str | None:
        if isinstance(self.system, list):
            return "".join(b.text for b in self.system)
        return self.system


class MessagesRequest(CountTokensRequest):
    dtype: Dtype | None = Field(None, description="dtype extension (extra_body={'dtype': ...})")
    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[StopString], Field(max_length=8)] | None = None
    stream: StrictBool = False
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: None = Field(None, description="not supported")
    metadata: Metadata | None = None
    cache_control: dict[str, Any] | None = Field(None, description="accepted; prompt prefixes are cached anyway")
    service_tier: Literal["auto", "standard_only"] | None = None

    _numbers = numbers_only("max_tokens", "temperature", "top_p")

    @field_validator("top_k", mode="before")
    @classmethod
    def _no_top_k(cls, value: object) -> None:
        if value is not None:
            raise ValueError("not supported: use temperature and top_p")
        return None


# status -> (Anthropic's status, Anthropic's error type); validation errors are 400s there
ERROR_TYPES: dict[int, tuple[int, str]] = {
    400: (400, "invalid_request_error"), 401: (401, "authentication_error"), 403: (403, "permission_error"),
    404: (404, "not_found_error"), 413: (413, "request_too_large"), 422: (400, "invalid_request_error"),
    429: (429, "rate_limit_error"), 500: (500, "api_error"), 503: (503, "overloaded_error"),
    507: (507, "api_error"),
}


class AnthropicError(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    type: str = "error"
    error: AnthropicError


def anthropic_error(status: int, message: str) -> tuple[int, dict]:
    """Anthropic's status and body for an error this server reports with `status`."""
    status, type_ = ERROR_TYPES.get(status, (status, "api_error" if status >= 500 else "invalid_request_error"))
    return status, {"type": "error", "error": {"type": type_, "message": message}}


def is_anthropic_path(path: str) -> bool:
    """Whether a request path belongs to the Anthropic front door (its errors take Anthropic's shape)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")
