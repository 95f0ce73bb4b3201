"""The model's own tool-call syntax (`tool_choice: auto`), read with mlx-lm's tool parsers: the markers
that open and close a call (the tokenizer's `tool_call_start`/`_end`, inferred by mlx-lm from the chat
template) and the family's parser of the text between them. Plain Python: routes use it on the text."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolCallSyntax:
    start: str
    end: str  # may be "" (a call runs to the end of the text)
    parse_call: Callable[[str, Any], Any]  # mlx-lm's parse_tool_call(text, tools): {name, arguments} or a list

    @classmethod
    def of(cls, tokenizer: Any) -> ToolCallSyntax | None:
        """The syntax of an mlx-lm TokenizerWrapper's model family, None where mlx-lm knows none."""
        if not getattr(tokenizer, "has_tool_calling", False) or tokenizer.tool_parser is None:
            return None
        return cls(tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser)

    def split(self, text: str, tools: list[dict] | None) -> tuple[str, list[tuple[str, str]]]:
        """(the text outside the calls, [(function name, arguments as JSON text)]). A call that does not
        parse (cut off by max_tokens) stays in the text."""
        content, calls, rest = [], [], text
        while self.start in rest:
            before, _, after = rest.partition(self.start)
            body, found_end, rest = after.partition(self.end) if self.end else (after, "", "")
            parsed = self._parse(body, tools)
            if parsed is None:
                content.append(before + self.start + body + found_end)
                continue
            content.append(before)
            calls += parsed
        content.append(rest)
        return "".join(content), calls

    def _parse(self, body: str, tools: list[dict] | None) -> list[tuple[str, str]] | None:
        try:
            parsed = self.parse_call(body, tools)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            log.info("tool call did not parse (%s): kept as text", type(e).__name__)
            return None
        calls = parsed if isinstance(parsed, list) else [parsed]
        try:
            return [(str(c["name"]), c["arguments"] if isinstance(c["arguments"], str)
                     else json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
        except (KeyError, TypeError):
            return None


class ToolCallStream:
    """Streamed text with the calls taken out: `feed` gives the text that can go out now (held back from
    the first marker, or what may be the start of one), `finish` the rest and the calls."""

    def __init__(self, syntax: ToolCallSyntax, tools: list[dict] | None) -> None:
        self.syntax = syntax
        self.tools = tools
        self._held = ""
        self._in_call = False

    def feed(self, text: str) -> str:
        self._held += text
        if self._in_call:
            return ""
        at = self._held.find(self.syntax.start)
        if at >= 0:
            self._in_call = True
            out, self._held = self._held[:at], self._held[at:]
            return out
        keep = _partial_suffix(self._held, self.syntax.start)
        out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def finish(self) -> tuple[str, list[tuple[str, str]]]:
        return self.syntax.split(self._held, self.tools)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
