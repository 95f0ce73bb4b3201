"""Turning a request into prompt tokens, with the length limits, away from the MLX worker.

Tokenizing and chat templating are plain CPU work on the tokenizer; on the one MLX thread a 1 MB prompt
stalled every stream for as long as it took. A `PromptEncoder` does it on any thread, and refuses a text
that cannot fit the context from its length alone, before tokenizing: no token covers more characters
than the longest entry of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.api import GenerationParams
from models.errors import InvalidRequestError
from models.text.prompt_encoding import encode_text, prompt_text

# Characters added to the bound: templates and special tokens may come on top of the user's text.
_BOUND_SLACK = 256


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one vocabulary entry can stand for (byte-level BPE: one symbol per byte, so
    never fewer symbols than characters)."""
    vocab = tokenizer.get_vocab()
    return max((len(piece) for piece in vocab), default=1) or 1


@dataclass(frozen=True)
class PromptEncoder:
    """A model's tokenizer and context: encodes a request's prompt or chat and checks it fits."""

    tokenizer: Any
    context_length: int
    max_token_chars: int
    vocab_size: int = 0  # token-id prompts must lie in [0, vocab_size) (0: unchecked)

    @classmethod
    def of(cls, tokenizer: Any, context_length: int) -> PromptEncoder:
        return cls(tokenizer, context_length, longest_token_chars(tokenizer), len(tokenizer.get_vocab()))

    @property
    def max_chars(self) -> int:
        """Texts longer than this cannot fit the context, whatever their tokens."""
        return self.context_length * self.max_token_chars + _BOUND_SLACK

    def check_size(self, params: GenerationParams) -> None:
        """Refuse, from its length alone, a prompt or chat that cannot fit the context."""
        if params.prompt_tokens is not None:
            if self.context_length and len(params.prompt_tokens) > self.context_length:
                raise InvalidRequestError(f"the prompt ({len(params.prompt_tokens)} tokens) does not fit the "
                                          f"context length of {self.context_length} tokens")
            return
        if params.messages is not None:
            size = sum(len(m.get("content") or "") for m in params.messages)
        else:
            size = len(params.prompt or "")
        if self.context_length and size > self.max_chars:
            raise InvalidRequestError(f"the prompt ({size} characters) cannot fit the context length of "
                                      f"{self.context_length} tokens")

    def encode(self, params: GenerationParams) -> list[int]:
        """The prompt's tokens (a chat rendered with the tokenizer's template, tools included); the size is
        checked first."""
        self.check_size(params)
        if params.prompt_tokens is not None:
            if self.vocab_size and any(not 0 <= t < self.vocab_size for t in params.prompt_tokens):
                raise InvalidRequestError(f"prompt: token ids must be in [0, {self.vocab_size})")
            if not params.prompt_tokens:
                raise InvalidRequestError("the prompt is empty")
            return list(params.prompt_tokens)
        tokens = encode_text(self.tokenizer, prompt_text(self.tokenizer, params.prompt, params.messages, params.tools))
        if not tokens:
            raise InvalidRequestError("the prompt is empty after tokenization")
        return list(tokens)

    def check_fits(self, tokens: list[int], max_tokens: int) -> None:
        """The prompt and `max_tokens` new tokens fit the context."""
        context = self.context_length
        if len(tokens) >= context:
            raise InvalidRequestError(f"the prompt ({len(tokens)} tokens) does not fit the context length "
                                      f"of {context} tokens")
        if len(tokens) + max_tokens > context:
            raise InvalidRequestError(
                f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context length of {context} tokens")
