"""The one interface between server/ and the engine: plain Python values, no MLX arrays."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from models.text.tool_calls import ToolCallSyntax


@dataclass(frozen=True)
class OutputConstraint:
    """Structured output: what the generated text must match. `kind` is `json_object` (any JSON object),
    `json_schema` (`spec`: the schema as JSON text), `regex`, `choice` (`spec`: a JSON list of strings) or
    `grammar` (`spec`: a Lark grammar, llguidance's dialect). A spec that cannot compile is an
    InvalidRequestError; the text then parses (or the generation ends with `length`)."""

    kind: str
    spec: str = ""


@dataclass(frozen=True)
class GenerationParams:
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None  # chat: rendered with the tokenizer's template
    tools: tuple[dict, ...] | None = None  # chat: tool definitions the template renders (never parsed back)
    model: str | None = None
    dtype: str | None = None  # canonical name or None for the startup default
    max_tokens: int | None = None  # None: the server default, capped by the context left
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False  # generate max_tokens even past end-of-sequence (benchmarks, load tests)
    # Requests reuse cached prompt prefixes only within one scope (the server derives it from the
    # tenant and the request's cache_salt): an opaque string, never shown to anyone.
    cache_scope: str = ""
    constraint: OutputConstraint | None = None  # structured output (models.decode.constraints)


@dataclass(frozen=True)
class Started:
    """The first event: the request was admitted to this variant (dtype resolved)."""

    model: str
    dtype: str
    prompt_tokens: int
    float_dtype: str = ""  # the dtype of the variant's unquantized rest (its only dtype if unquantized)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and its `top` alternatives; None where the logits were not finite
    (a float16 overflow gives NaN), since JSON has no NaN or infinity."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float | None], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text, with the logprobs of the tokens behind it when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()

    def then(self, following: TextDelta) -> TextDelta:
        """This delta and the following one as one."""
        return TextDelta(self.text + following.text, self.logprobs + following.logprobs)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled again)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    model: str
    dtype: str
    finish_reason: str  # "stop" or "length"
    usage: Usage
    time_to_first_token_s: float
    total_s: float
    decode_tokens_per_second: float
    warnings: tuple[str, ...] = field(default=())
    float_dtype: str = ""  # the dtype of the variant's unquantized rest (its only dtype if unquantized)
    stop_sequence: str | None = None  # the stop string that ended it, when one did


@dataclass(frozen=True)
class TokenizeParams:
    """A prompt to tokenize as generation would: `prompt`, or `messages` (and `tools`) through the chat template."""

    model: str | None = None
    dtype: str | None = None  # loaded only if no variant of the model is resident (all share the tokenizer)
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    tools: tuple[dict, ...] | None = None
    add_special_tokens: bool | None = None  # None: as generation does (BOS unless the text starts with it)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@dataclass(frozen=True)
class Tokenized:
    model: str  # the canonical model name
    tokens: tuple[int, ...]
    token_strs: tuple[str, ...]  # each token's text as the tokenizer spells it
    max_model_len: int


class Engine(Protocol):
    default_model: str
    default_dtype: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def generate(self, params: GenerationParams) -> AsyncIterator[Started | TextDelta | Finished]: ...
    async def load(self, model: str | None, dtype: str | None) -> dict: ...
    async def unload(self, model: str, dtype: str) -> dict: ...
    async def estimate(self, model: str | None, dtype: str | None, include_quantized: bool = False) -> list[dict]: ...
    async def report(self, model: str | None, dtypes: tuple[str, ...] | None,
                     prompts: tuple[str, ...] | None, retry: bool = False, scope: str = "") -> dict: ...
    async def memory(self) -> dict: ...
    def health(self) -> dict: ...
    def model_names(self) -> list[str]: ...
    async def tokenize(self, params: TokenizeParams) -> Tokenized: ...
    async def detokenize(self, model: str | None, tokens: tuple[int, ...]) -> str: ...
    def tool_syntax(self, model: str) -> ToolCallSyntax | None: ...
