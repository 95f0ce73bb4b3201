"""OpenAI-compatible request and response bodies (/v1/completions, /v1/chat/completions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, WithJsonSchema

from server.schemas import DTYPE_HELP, SEED_LIMIT, CacheSalt, Dtype, StopStrings, json_number, numbers_only
from server.structured import ResponseFormat, StructuredOutputs, ToolChoice
from server.tool_schemas import ChatTool

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


Prompt = Annotated[str, Field(min_length=1, max_length=1_000_000)]
# A prompt given as token ids (lm-eval's local-completions sends these); checked against the vocabulary later.
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(json_number)]  # 2.0 yes, true and "2" no
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]
MAX_LOGPROBS = 20
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
    prompt: (Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]) = Field(
        description="one prompt: a string or token ids (a list of one of either is accepted)")
    max_tokens: int | None = Field(None, ge=0, description="default: 16, as OpenAI's; 0 (score the prompt, "
                                   "generate nothing) only with `echo` or `prompt_logprobs`")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the top N per token; with `echo` "
                                 "for the prompt's tokens too (the first one's logprob is null)")
    echo: StrictBool = Field(False, description="return the prompt before the completion")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM's: each prompt token's "
                                        "logprob, rank and the top N, in `choices[0].prompt_logprobs`")
    suffix: None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1)

    _completion_numbers = numbers_only("max_tokens", "logprobs", "best_of", "prompt_logprobs")

    def prompt_text(self) -> str | None:
        """The prompt as a string, or None where it is given as token ids."""
        prompt = self.prompt if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int) \
            else self.prompt[0]
        return prompt if isinstance(prompt, str) else None

    def prompt_tokens(self) -> tuple[int, ...] | None:
        """The prompt's token ids where it is given as ids, else None."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        return tuple(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else None


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
    echo: StrictBool = Field(False, description="vLLM's: the reply starts with the last message's content "
                             "when that message is the assistant's")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=128, description="rendered through the chat template")
    tool_choice: ToolChoice | None = Field(None, description="auto (default with tools), none, required, or a "
                                           "named function; the last two are enforced (the arguments validate)")
    parallel_tool_calls: StrictBool | None = Field(None, description="with tool_choice required: more than one call")

    _chat_numbers = numbers_only("max_tokens", "max_completion_tokens", "top_logprobs")

