"""OpenAI Responses API request bodies (POST /v1/responses): the stateless subset this server serves."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag, field_validator

from server.schemas import Dtype, numbers_only
from server.structured import TextFormat
from server.tool_schemas import JsonSchema, ToolName

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
_LENIENT = ConfigDict(extra="ignore", allow_inf_nan=False)  # items echoed back from an earlier response
Text = Annotated[str, Field(max_length=1_000_000)]
CallId = Annotated[str, Field(min_length=1, max_length=256)]


class InputText(BaseModel):
    model_config = _LENIENT
    type: Literal["input_text", "output_text"]
    text: Text


class InputMessage(BaseModel):
    """A message: the user's or system's input, or an assistant output passed back as history."""

    model_config = _LENIENT
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Annotated[list[InputText], Field(max_length=1000)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    """A tool call the model made earlier, passed back as history."""

    model_config = _LENIENT
    type: Literal["function_call"]
    call_id: CallId
    name: str = ToolName
    arguments: Text = Field(description="the arguments as a JSON object, encoded")


class FunctionCallOutputItem(BaseModel):
    model_config = _LENIENT
    type: Literal["function_call_output"]
    call_id: CallId
    output: Text | Annotated[list[InputText], Field(max_length=1000)]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(value: Any) -> str:
    """The item's `type`; a message may leave it out, as the SDK's easy input messages do."""
    found = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return found if found in ("message", "function_call", "function_call_output") else "message"


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")], Discriminator(_item_type)]


class FunctionTool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    name: str = ToolName
    description: str | None = Field(None, max_length=100_000)
    parameters: JsonSchema | None = None
    strict: StrictBool | None = Field(None, description="accepted; tool_choice required or a named function "
                                      "enforces the arguments")


class NamedFunctionChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    name: str = ToolName


class TextConfig(BaseModel):
    model_config = _STRICT
    format: TextFormat | None = Field(None, description="json_object or json_schema: enforced")


class ResponsesRequest(BaseModel):
    model_config = _STRICT

    model: str | None = Field(None, min_length=1, max_length=300,
                              description="model id from /v1/models; `name:dtype` picks a dtype")
    dtype: Dtype | None = Field(None, description="dtype extension (extra_body={'dtype': ...})")
    input: Annotated[str, Field(min_length=1, max_length=1_000_000)] | Annotated[
        list[InputItem], Field(min_length=1, max_length=1000)]
    instructions: str | None = Field(None, max_length=1_000_000, description="a system message before the input")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: StrictBool = False
    tools: list[FunctionTool] | None = Field(None, max_length=128, description="function tools, rendered "
                                             "through the chat template")
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = Field(
        None, description="`none` leaves the tools out; `required` or a named function is enforced (the "
        "arguments validate); `auto` returns the calls written in the model's own syntax")
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = Field(None, description="`auto` is not supported")
    store: StrictBool | None = Field(None, description="accepted; nothing is stored (stateless)")
    previous_response_id: None = Field(None, description="not supported: the server is stateless")
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)

    _numbers = numbers_only("max_output_tokens", "temperature", "top_p")

    @field_validator("previous_response_id", mode="before")
    @classmethod
    def _stateless(cls, value: object) -> None:
        if value is not None:
            raise ValueError("not supported: the server keeps no responses; send the conversation as input")
        return None

    def echo(self) -> dict[str, Any]:
        """The request's settings as a Response object repeats them."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p,
                "tools": [t.model_dump(exclude_none=True) for t in self.tools or ()],
                "tool_choice": self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel)
                else self.tool_choice or "auto",
                "parallel_tool_calls": True if self.parallel_tool_calls is None else self.parallel_tool_calls,
                "text": {"format": self.text.format.model_dump(by_alias=True, exclude_none=True)
                         if self.text and self.text.format else {"type": "text"}},
                "truncation": "disabled", "store": False,
                "previous_response_id": None, "metadata": self.metadata or {}, "user": self.user,
                "background": False, "reasoning": {"effort": None, "summary": None}}
