"""Probe prompts for fidelity reports: a small bundled set and a bounded loader for user prompt files.

Pure Python (no mlx): the server can validate an uploaded prompt list before queueing a job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

MAX_PROMPTS = 256
MAX_PROMPT_CHARS = 2000
# A file can hold at most MAX_PROMPTS prompts of MAX_PROMPT_CHARS characters (UTF-8: up to 4 bytes
# each) plus JSON quoting; anything much larger is refused before it is read.
MAX_FILE_BYTES = 4 * 1024 * 1024

# Short English prompts (the bundled model was trained on templated sentences like these) and
# arithmetic prompts of the bundled model's task. Kept short so a report over them is quick.
BUNDLED_PROMPTS: tuple[str, ...] = (
    "The small cat sees the",
    "Alice likes to read books",
    "The dog runs in the park",
    "Bob and Carol went to the",
    "It is sunny today, so Emma stays in the",
    "Hello, Noah! How are you",
    "Where is the red book? It is in the",
    "In the morning, Grace paints a",
    "I think the river is very",
    "We can plant flowers in the garden",
    "Mia has a blue boat and a",
    "The old farmer walks while the horse",
    "Once upon a time, there was a",
    "The capital of France is",
    "17+25=",
    "3+4=",
    "58+61=",
    "99+99=",
    "40+2=",
    "12+87=",
    "7+70=",
    "66+33=",
)


def bundled_prompts() -> list[str]:
    return list(BUNDLED_PROMPTS)


def validate_prompts(prompts: Iterable[object], source: str = "prompts") -> list[str]:
    """Check a prompt list against the bounds; returns it as a list of str or raises ValueError."""
    out: list[str] = []
    for i, prompt in enumerate(prompts, start=1):
        if len(out) >= MAX_PROMPTS:
            raise ValueError(f"{source}: more than {MAX_PROMPTS} prompts")
        if not isinstance(prompt, str):
            raise ValueError(f"{source}: prompt {i} is a {type(prompt).__name__}, not a string")
        if not prompt.strip():
            raise ValueError(f"{source}: prompt {i} is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{source}: prompt {i} has {len(prompt)} characters (at most {MAX_PROMPT_CHARS})")
        out.append(prompt)
    return out


def parse_prompts(text: str, jsonl: bool | None = None, source: str = "prompts") -> list[str]:
    """Prompts from file text: one per line, or JSON lines {"prompt": "..."}.

    With `jsonl` None the format is detected: JSON lines if the first non-blank line starts with "{".
    Blank lines are skipped; a line's trailing "\\r" is dropped. Raises ValueError with the line number.
    """
    lines = text.splitlines()
    if jsonl is None:
        first = next((line for line in lines if line.strip()), "")
        jsonl = first.lstrip().startswith("{")
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(prompts) >= MAX_PROMPTS:
            raise ValueError(f"{source}: more than {MAX_PROMPTS} prompts")
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: line {number} is not valid JSON ({e.msg})") from None
            if not isinstance(item, dict) or "prompt" not in item:
                raise ValueError(f"{source}: line {number} must be a JSON object with a \"prompt\" field")
            prompt = item["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"{source}: line {number}: \"prompt\" must be a string")
        else:
            prompt = line
        if not prompt.strip():
            raise ValueError(f"{source}: line {number}: the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{source}: line {number}: the prompt has {len(prompt)} characters "
                             f"(at most {MAX_PROMPT_CHARS})")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return prompts


def load_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line) or a .jsonl file ({"prompt": ...} per line)."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ValueError(f"cannot read prompt file {name!r}: {e.strerror or type(e).__name__}") from None
    if size > MAX_FILE_BYTES:
        raise ValueError(f"prompt file {name!r} is {size} bytes (at most {MAX_FILE_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {name!r} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read prompt file {name!r}: {e.strerror or type(e).__name__}") from None
    jsonl = True if path.suffix.lower() in (".jsonl", ".ndjson") else None
    return parse_prompts(text, jsonl=jsonl, source=f"prompt file {name!r}")


def probe_set(user_prompts: Iterable[str] | None = None, include_bundled: bool = True) -> list[str]:
    """The bundled prompts followed by the user's (validated), without duplicates, in order."""
    user = validate_prompts(user_prompts or [], source="user prompts")
    seen: set[str] = set()
    out: list[str] = []
    for prompt in [*(BUNDLED_PROMPTS if include_bundled else ()), *user]:
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    if not out:
        raise ValueError("the probe set is empty")
    return out
