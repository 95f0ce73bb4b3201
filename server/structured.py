"""Structured output and enforced tool calls, as the OpenAI and vLLM request fields spell them, turned into
the engine's one OutputConstraint; and the tool calls read back from a constrained completion."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.api import OutputConstraint
from server.tool_schemas import ChatTool

JsonSchema = dict[str, Any]
_SPEC = Field(None, max_length=100_000)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = Field(None, max_length=100_000)
    schema_: JsonSchema = Field(default_factory=dict, alias="schema", description="the JSON Schema")
    strict: bool | None = Field(None, description="accepted; the output is always enforced")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="required with type json_schema")


class TextFormat(BaseModel):
    """The Responses API's `text.format`: as `response_format`, the schema's fields inline."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = Field(None, max_length=100_000)
    schema_: JsonSchema | None = Field(None, alias="schema", description="required with type json_schema")
    strict: bool | None = None

    def as_response_format(self) -> ResponseFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format: type json_schema needs a `schema`")
        schema = JsonSchemaFormat(schema=self.schema_) if self.schema_ is not None else None
        return ResponseFormat(type=self.type, json_schema=schema if self.type == "json_schema" else None)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (one of them): `json` (a schema), `regex`, `choice`, `grammar` (Lark, in
    llguidance's dialect), `json_object`."""

    model_config = ConfigDict(extra="forbid")
    json_: JsonSchema | str | None = Field(None, alias="json")
    regex: str | None = _SPEC
    choice: list[str] | None = Field(None, min_length=1, max_length=1000)
    grammar: str | None = _SPEC
    json_object: bool | None = None

    def given(self) -> list[str]:
        return [k.rstrip("_") for k in ("json_", "regex", "choice", "grammar", "json_object")
                if getattr(self, k) not in (None, False)]


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


def _schema_text(schema: JsonSchema | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def output_constraint(response_format: ResponseFormat | None,
                      structured: StructuredOutputs | None) -> OutputConstraint | None:
    """The constraint a request's `response_format` or `structured_outputs` asks for (None: free text);
    ValueError (a 400) for a combination that asks for none or several."""
    if response_format is not None and structured is not None and response_format.type != "text":
        raise ValueError("give either response_format or structured_outputs, not both")
    if structured is not None:
        if len(structured.given()) != 1:
            raise ValueError("structured_outputs: give exactly one of json, regex, choice, grammar, json_object "
                             f"(given: {', '.join(structured.given()) or 'none'})")
        if structured.json_ is not None:
            return OutputConstraint("json_schema", _schema_text(structured.json_))
        if structured.regex is not None:
            return OutputConstraint("regex", structured.regex)
        if structured.choice is not None:
            return OutputConstraint("choice", json.dumps(structured.choice))
        if structured.grammar is not None:
            return OutputConstraint("grammar", structured.grammar)
        return OutputConstraint("json_object")
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputConstraint("json_object")
    if response_format.json_schema is None:
        raise ValueError("response_format: type json_schema needs a `json_schema` object with the schema")
    return OutputConstraint("json_schema", json.dumps(response_format.json_schema.schema_))


def _parameters(tool: ChatTool) -> JsonSchema:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_constraint(tools: list[ChatTool], choice: ToolChoice | None, parallel: bool) -> OutputConstraint | None:
    """The constraint that enforces `tool_choice` (as vLLM does): a named function's arguments as its
    parameters' schema; `required`: a JSON array of {name, parameters} calls, one at most unless `parallel`.
    None for `auto` and `none` (free text)."""
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        return OutputConstraint("json_schema", json.dumps(_parameters(named[0])))
    if choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: JsonSchema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return OutputConstraint("json_schema", json.dumps(schema))


def tool_calls_from(text: str, choice: ToolChoice | None) -> list[dict] | None:
    """The OpenAI `tool_calls` of an enforced completion (None if it does not parse: it ended by length)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(choice, NamedToolChoice):
        calls = [(choice.function.name, value)]
    else:
        calls = [(call["name"], call["parameters"]) for call in value]
    return openai_tool_calls([(name, json.dumps(args)) for name, args in calls])


def openai_tool_calls(calls: list[tuple[str, str]]) -> list[dict]:
    """(name, arguments JSON text) pairs in OpenAI's `tool_calls` shape, each with a new id."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}} for name, arguments in calls]


def template_arguments(arguments: str) -> Any:
    """A past call's arguments as chat templates expect them (a mapping), or the text if it is no JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
