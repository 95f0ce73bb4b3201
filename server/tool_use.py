"""One request's tools, whichever front door it came through: what the chat template renders, the constraint
that enforces the tool choice, and the calls read back from the generated text (enforced JSON, or the
model's own syntax under `auto`). Front doors only reshape its results into their own items and events."""

from __future__ import annotations

from dataclasses import dataclass

from models.api import OutputConstraint
from models.text.tool_calls import ToolCallStream, ToolCallSyntax
from server.structured import (
    NamedFunction,
    NamedToolChoice,
    ToolChoice,
    openai_tool_calls,
    tool_calls_from,
    tool_constraint,
)
from server.tool_schemas import ChatTool, FunctionDefinition, JsonSchema, template_tool


@dataclass(frozen=True)
class ToolUse:
    """`choice` is `auto`, `none`, `required` or a NamedToolChoice; `parallel`: `required` may make several."""

    tools: tuple[ChatTool, ...]
    choice: ToolChoice
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[tuple[str, str | None, JsonSchema | None]], choice: str | None,
           parallel: bool = True) -> ToolUse | None:
        """From (name, description, parameters) and a choice (`auto`, `none`, `required` or a tool's name);
        None without tools. ValueError (a 400) for a choice that names no tool, or a choice without tools."""
        if not tools:
            if choice not in (None, "none", "auto"):
                raise ValueError("tool_choice: no tools given")
            return None
        chat_tools = tuple(ChatTool(type="function", function=FunctionDefinition(
            name=name, description=description, parameters=parameters)) for name, description, parameters in tools)
        if choice in (None, "auto", "none", "required"):
            return cls(chat_tools, choice or "auto", parallel)
        if choice not in {t.function.name for t in chat_tools}:
            raise ValueError(f"tool_choice names {choice!r}, which is not among the tools")
        return cls(chat_tools, NamedToolChoice(type="function", function=NamedFunction(name=choice)), parallel)

    @property
    def enforced(self) -> bool:
        """`required` or a named tool: the output is constrained to the calls' JSON."""
        return self.choice not in ("auto", "none")

    def template_tools(self) -> tuple[dict, ...] | None:
        """The tools as the chat template renders them (none for `none`)."""
        if self.choice == "none":
            return None
        return tuple(template_tool(t.function.name, t.function.description, t.function.parameters)
                     for t in self.tools)

    def constraint(self) -> OutputConstraint | None:
        return tool_constraint(list(self.tools), self.choice, self.parallel) if self.enforced else None

    def reader(self, syntax: ToolCallSyntax | None) -> CallReader | None:
        """How to read this request's calls back from its text: None where calls cannot occur (`none`, or
        `auto` on a model whose tool-call syntax mlx-lm does not know)."""
        if self.enforced:
            return CallReader(self.choice, None)
        if self.choice == "auto" and syntax is not None:
            return CallReader(None, ToolCallStream(syntax, list(self.template_tools() or ())))
        return None


class CallReader:
    """Generated text with the tool calls taken out: `feed` gives the text that can go out now, `finish` the
    rest and the calls in OpenAI's `tool_calls` shape (an enforced choice that did not parse, because it
    ended by length, gives its text and no calls)."""

    def __init__(self, enforced: ToolChoice | None, stream: ToolCallStream | None) -> None:
        self._enforced, self._stream = enforced, stream
        self._held: list[str] = []

    def feed(self, text: str) -> str:
        if self._stream is not None:
            return self._stream.feed(text)
        self._held.append(text)
        return ""

    def read(self, text: str) -> tuple[str, list[dict]]:
        """A whole text at once: (the text outside the calls, the calls)."""
        shown = self.feed(text)
        rest, calls = self.finish()
        return shown + rest, calls

    def finish(self) -> tuple[str, list[dict]]:
        if self._stream is not None:
            text, found = self._stream.finish()
            return text, openai_tool_calls(found)
        text = "".join(self._held)
        calls = tool_calls_from(text, self._enforced)
        return ("", calls) if calls else (text, [])
