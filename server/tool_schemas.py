"""Tool definitions as each front door spells them, and the one form chat templates take
(Hugging Face's: `{"type": "function", "function": {name, description, parameters}}`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ToolName = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
JsonSchema = dict[str, Any]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ToolName
    description: str | None = Field(None, max_length=100_000)
    parameters: JsonSchema | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = Field(None, description="accepted; tool_choice required or a named function "
                                "enforces the arguments")


class ChatTool(BaseModel):
    """OpenAI Chat Completions' (and vLLM's /tokenize) tool."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


def template_tool(name: str, description: str | None, parameters: JsonSchema | None) -> dict:
    """A tool as chat templates read it."""
    function: dict = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


def assistant_message(text: str, calls: list[tuple[str, str, dict]]) -> dict:
    """An assistant turn as chat templates read it, with the tool calls it made: (id, name, arguments)."""
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
                                 for call_id, name, args in calls]
    return message


def tool_result_message(call_id: str, content: str, name: str | None = None) -> dict:
    """A tool's result as chat templates read it (role `tool`)."""
    message = {"role": "tool", "tool_call_id": call_id, "content": content}
    if name is not None:
        message["name"] = name
    return message
