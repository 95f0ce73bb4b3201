"""OpenAI-compatible request and response bodies (/v1/completions, /v1/chat/completions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema

from server.schemas import DTYPE_HELP, SEED_LIMIT, CacheSalt, Dtype, StopStrings, numbers_only
from server.structured import ResponseFormat, StructuredOutputs, ToolChoice
from server.tool_schemas import ChatTool

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


Prompt = Annotated[str, Field(min_length=1, max_length=1_000_000)]
_TOKEN_ID = r"^[0-9]{1,9}$"
# Keys are token ids; the schema says so exactly (pydantic alone leaves other keys unconstrained).
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=_TOKEN_ID)], Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=300),
    WithJsonSchema({"type": "object", "maxProperties": 300, "additionalProperties": False,
                    "patternProperties": {_TOKEN_ID: {"type": "number", "minimum": -100, "maximum": 100}}}),
]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints, with OpenAI's defaults."""

    model_config = _STRICT

    model: str | None = Field(None, min_length=1, max_length=300,
                              description="model id from /v1/models; `name:dtype` picks a dtype")
    dtype: Dtype | None = Field(None, description="precision extension (extra_body={'dtype': ...}): " + DTYPE_HELP)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StopStrings | None = None
    seed: int | None = Field(None, ge=-SEED_LIMIT, le=SEED_LIMIT)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = Field(None, description="token id -> bias in [-100, 100]")
    user: str | None = Field(None, max_length=256)
    ignore_eos: StrictBool = Field(False, description="extension: generate max_tokens even past end-of-sequence")
    cache_salt: CacheSalt
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: enforced")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: json, regex, choice, "
                                                         "grammar (Lark) or json_object, enforced")

    _numbers = numbers_only("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty")


class CompletionRequest(_SamplingFields):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a list of one string is accepted)")
    max_tokens: int | None = Field(None, ge=1, description="default: 16, as OpenAI's")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = Field(False, description="not supported")
    suffix: None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1)

    _completion_numbers = numbers_only("max_tokens", "logprobs", "best_of")


    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# Constrained strings are checked as Unicode when parsed, so a lone surrogate ("\\ud800") is a 422,
# as in `prompt`, instead of reaching the tokenizer.
MessageText = Annotated[str, Field(max_length=1_000_000)]
MAX_TEXT_PARTS = 64  # per message: each part is validated and joined on the event loop


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: MessageText


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=128)
    arguments: str = Field(max_length=1_000_000)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: MessageText | Annotated[list[TextPart], Field(max_length=MAX_TEXT_PARTS)] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, max_length=256, description="a tool result's call")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = Field(None, description="null or false: none (OpenAI accepts null)")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=128, description="rendered through the chat template")
    tool_choice: ToolChoice | None = Field(None, description="auto (default with tools), none, required, or a "
                                           "named function; the last two are enforced (the arguments validate)")
    parallel_tool_calls: StrictBool | None = Field(None, description="with tool_choice required: more than one call")

    _chat_numbers = numbers_only("max_tokens", "max_completion_tokens", "top_logprobs")

