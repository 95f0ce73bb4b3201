"""Prompts to token ids, the one way generation and /tokenize both use: plain text, or chat messages
(with tools, where the template renders them) through the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

import jinja2

from models.errors import InvalidRequestError


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads a `tools` variable (HF's convention for tool use)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: any of them
        template = " ".join(t for t in template.values() if isinstance(t, str))
    return isinstance(template, str) and "tools" in template


def render_chat(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None, *,
                add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The chat template's text for `messages`; InvalidRequestError where the template cannot render them."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise InvalidRequestError("this model's tokenizer has no chat template: send a plain prompt")
    if tools and not renders_tools(tokenizer):
        # Rendering would drop them silently: the model would never see the tools.
        raise InvalidRequestError("tools: this model's chat template does not render tools")
    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             tokenize=False, **extra)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        raise InvalidRequestError(f"the chat template could not render these messages: {e}") from None


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of `text`. By default the tokenizer's special tokens (BOS) are added unless the text
    already starts with BOS, as a rendered chat template does."""
    if add_special_tokens is None:
        bos = tokenizer.bos_token
        add_special_tokens = bos is None or not text.startswith(bos)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def prompt_text(tokenizer: Any, prompt: str | None, messages: Any = None, tools: Any = None, *,
                add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The text a request stands for: its `prompt`, or its `messages` (and `tools`) through the chat template."""
    if messages is None:
        return prompt or ""
    return render_chat(tokenizer, list(messages), list(tools) if tools else None,
                       add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
