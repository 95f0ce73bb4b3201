"""Structured output: a request's constraint (JSON schema, regex, choice, Lark grammar) compiled with
llguidance, and the logits processor that masks each step's logits to the tokens its grammar allows.

The processor is an mlx-lm logits processor, `(tokens, logits) -> logits`, so a constrained row gets its
mask inside the batched step (mlx-lm's BatchGenerator keeps per-row processors) and in the lone stream
alike: each call but the first consumes the token sampled last (`tokens[-1]`), then masks. Every sample
of a row passes through its processors exactly once, so the grammar stays in step with the output
(docs/structured-output.md says why llguidance, and what it costs per token).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np
from llguidance._tokenizer import TokenizerWrapper as TokenBytesWrapper
from mlx_lm.tokenizer_utils import TokenizerWrapper

from models.api import OutputConstraint
from models.errors import InvalidRequestError
from models.mlx_lm_ext.internals import wrapped_tokenizer

log = logging.getLogger(__name__)
# Compact JSON unless the schema's `x-guidance` says otherwise: flexible whitespace lets a weak model
# spend its tokens on blanks.
JSON_DEFAULTS: llguidance.JsonCompileOptions = {"whitespace_flexible": False}
MAX_SPEC_CHARS = 200_000

_tokenizers: dict[int, tuple[Any, llguidance.LLTokenizer]] = {}  # id(hf tokenizer) -> (it, its LLTokenizer)
_tokenizers_lock = threading.Lock()


class _TokenBytes:
    """What llguidance's TokenizerWrapper reads from a tokenizer it has no converter for (a character or
    word-level tokenizer.json): each token's bytes, the special ids, and an encoder."""

    def __init__(self, hf: Any, eos_ids: list[int]) -> None:
        self.hf = hf
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = hf.bos_token_id
        self.special_token_ids = sorted(set(hf.all_special_ids) | set(eos_ids))
        self.tokens = [hf.convert_ids_to_tokens(i) or "" if i in self.special_token_ids
                       else hf.decode([i]) for i in range(len(hf))]
        self.tokens = [t.encode() for t in self.tokens]

    def __call__(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)


def grammar_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of an mlx-lm TokenizerWrapper (built once per tokenizer: ~1 s for a large
    vocabulary): from its tokenizer.json where llguidance reads that family, else token by token."""
    hf = wrapped_tokenizer(tokenizer) if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    with _tokenizers_lock:
        cached = _tokenizers.get(id(hf))
        if cached is not None and cached[0] is hf:
            return cached[1]
    eos = getattr(tokenizer, "eos_token_ids", None) or hf.eos_token_id
    eos = sorted([eos] if isinstance(eos, int) else eos)
    try:
        from llguidance.hf import from_tokenizer

        built = from_tokenizer(hf, n_vocab=len(hf), eos_token=eos)
    except ValueError:  # e.g. a `Fuse` decoder: not a byte-level family llguidance knows
        built = llguidance.LLTokenizer(TokenBytesWrapper(_TokenBytes(hf, eos)), n_vocab=len(hf), eos_token=eos)
    with _tokenizers_lock:
        _tokenizers[id(hf)] = (hf, built)
    return built


def constraint_grammar(constraint: OutputConstraint) -> str:
    """The llguidance grammar of a constraint; InvalidRequestError if it cannot be one."""
    if len(constraint.spec) > MAX_SPEC_CHARS:
        raise InvalidRequestError(f"{constraint.kind}: longer than {MAX_SPEC_CHARS} characters")
    try:
        if constraint.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_DEFAULTS)
        if constraint.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(constraint.spec, JSON_DEFAULTS)
        if constraint.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(constraint.spec)
        if constraint.kind == "choice":
            choices = json.loads(constraint.spec)
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if constraint.kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(constraint.spec)
    except ValueError as e:
        raise InvalidRequestError(f"{constraint.kind}: {e}") from None
    raise InvalidRequestError(f"unknown constraint kind {constraint.kind!r}")


def compile_constraint(tokenizer: Any, constraint: OutputConstraint) -> GrammarProcessor:
    """A fresh processor for one request (slow for large grammars: run it off the MLX worker);
    InvalidRequestError with llguidance's message for a schema or grammar it cannot compile."""
    grammar = constraint_grammar(constraint)
    llt = grammar_tokenizer(tokenizer)
    error = llguidance.LLMatcher.validate_grammar(grammar, llt)
    if error:
        raise InvalidRequestError(f"{constraint.kind}: {error[:500]}")
    matcher = llguidance.LLMatcher(llt, grammar)
    if matcher.is_error():
        raise InvalidRequestError(f"{constraint.kind}: {matcher.get_error()[:500]}")
    return GrammarProcessor(matcher, llt.vocab_size, llt.eos_tokens)


class GrammarProcessor:
    """mlx-lm logits processor for one request: masks every logit its grammar does not allow next.
    Once the grammar is complete only end-of-sequence is allowed, so the row ends with `stop`."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: list[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.started = False
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.failed = False  # a sampled token the grammar refused (non-finite logits): ends the row

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # the model's step runs while the host advances the grammar
        if self.started:
            self.advance(int(tokens[-1].item()))
        self.started = True
        return mx.where(self.allowed(logits.shape[-1]), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def advance(self, token: int) -> None:
        if not self.failed and not self.matcher.consume_token(token):
            self.failed = True
            log.warning("structured output: token %d refused by the grammar: %s", token, self.matcher.get_error())

    def allowed(self, width: int) -> mx.array:
        """The tokens allowed next, as a (width,) bool array (tokens past the tokenizer's: never)."""
        if self.failed:
            allowed = np.zeros(width, dtype=bool)
            allowed[[t for t in self.eos_ids if t < width]] = True
            return mx.array(allowed)
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:min(width, self.vocab_size)]
        if width > len(allowed):
            allowed = np.concatenate([allowed, np.zeros(width - len(allowed), dtype=np.uint8)])
        return mx.array(allowed.astype(bool))
