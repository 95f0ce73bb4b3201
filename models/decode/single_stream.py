"""One sequence decoded the way mlx_lm.stream_generate does it (a plain KV cache, the next step
queued before the current token is read), for a variant that serves a single request.

Batching has a price at batch size one (masks, padded caches, bookkeeping): on an H200 mlx-lm's
BatchGenerator decodes a lone sequence at about half of stream_generate's speed. So a variant with
one request decodes it here, and hands the sequence (KV cache and next token) to the batch as soon
as a second request arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from models.decode.prefill import prefill
from models.decode.step_rules import needs_logprobs, picked_finite
from models.mlx_lm_ext.quantized_batch_cache import quantize_layers


@dataclass
class TokenStep:
    """One decoded token, shaped like a BatchGenerator response."""

    uid: int
    token: int
    logprobs: mx.array  # (1, vocab): the step's scores
    finish_reason: str | None = None
    finite: bool = True  # the token's score is finite (checked on the device with the step, when checked)


class SingleStream:
    def __init__(self, model: Any, prompt: list[int], max_tokens: int, sampler: Callable | None,
                 processors: list, stop_tokens: set[int], uid: int, cache: list[Any] | None = None,
                 cached: int = 0, pad_prefill: bool = False, logprobs: bool = False,
                 check_every: int = 1, kv: tuple[int, int] | None = None) -> None:
        """`cache`, if given, holds the keys and values of the first `cached` prompt tokens;
        `pad_prefill`: prefill in bucket shapes (see models.decode.prefill); `logprobs`: the request reads
        them (a greedy one that does not decodes on raw float32 logits, as models.mlx_lm_ext.batch_generator does);
        `check_every`: tokens between non-finite checks (the first and the last are always checked);
        `kv`: (group size, bits) of a quantized KV cache, quantized after each prefill chunk as
        mlx_lm.generate does with `kv_bits` and `quantized_kv_start=0` (None: the model's float dtype)."""
        self.model = model
        self.uid = uid
        self.max_tokens = max_tokens
        self.sampler = sampler or greedy_sampler
        self.reads_logprobs = logprobs
        self.processors = processors
        self.stop_tokens = stop_tokens
        self.cache = cache if cache is not None else make_prompt_cache(model)
        self.tokens = list(prompt)  # prompt and generated tokens: the context of logits processors
        self.generated = 0
        self.check_every = check_every
        self._held: tuple | None = None
        with mx.stream(generation_stream):
            rest = mx.array(prompt[cached:] if cache is not None else prompt)
            quantize = None if kv is None else lambda layers: quantize_layers(layers, *kv)
            prefill(model, rest[:-1], self.cache, pad_prefill, quantize)  # the last token starts decoding
            self._next = self._forward(rest[-1:])
            if quantize is not None:  # a one-token prompt's first step attended to float keys, as in mlx-lm
                quantize(self.cache)
        mx.async_eval(*self._next)

    def _forward(self, inputs: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(token, logprobs, checked token). On a checked step the last is the token id if its score
        is finite, else -1 - id, so that one read gives the token and the check (no extra round trip);
        on the others it is the token. Each op costs ~15 us of host time on CUDA, a few % of a lone
        1B token, so only every `check_every`-th token is checked (an overflow stays in the KV cache).
        The logprobs are raw logits where nothing needs them normalized (see models.decode.step_rules)."""
        logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
        if self.processors:  # the context ends with this step's input, as in mlx-lm's generate_step
            context = mx.array(self.tokens) if self.generated == 0 else \
                mx.concatenate([mx.array(self.tokens), inputs.reshape(-1).astype(mx.int32)])
            for processor in self.processors:
                logits = processor(context, logits)
        logprobs = logits
        if needs_logprobs(logits.dtype, [self.sampler], self.reads_logprobs):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self.sampler(logprobs)
        queued = self.generated  # the index of the token this step computes
        if queued % self.check_every and queued + 1 < self.max_tokens:
            return token, logprobs, token
        signed = token.astype(mx.int32)
        finite = picked_finite(logprobs, signed)[:, 0]
        return token, logprobs, mx.where(finite, signed, -1 - signed)

    def step(self, queue_next: bool = True) -> TokenStep:
        """The next token; the step after it is already queued on the device (unless told not to)."""
        token_array, logprobs, checked = self._next
        self._held = None  # unstarted, it runs as its token is read
        self.generated += 1
        last = self.generated >= self.max_tokens
        if queue_next and not last:
            with mx.stream(generation_stream):
                self._next = self._forward(token_array)
            if self.generated == 1:  # held until the first token went out (as LeanGenerationBatch does)
                self._held = self._next
            else:
                mx.async_eval(*self._next)
        token = checked.item()
        finite = token >= 0
        token = token if finite else -1 - token
        self.tokens.append(token)
        finish = "stop" if token in self.stop_tokens else "length" if last else None
        return TokenStep(self.uid, token, logprobs, finish, finite)

    @property
    def holding(self) -> bool:
        return self._held is not None

    def start_held(self) -> None:
        """Start the queued step if it was held (unstarted, it runs when its token is read)."""
        held, self._held = self._held, None
        if held is not None:
            mx.async_eval(*held)

    def sync(self) -> None:
        """Wait for the step queued by the last `step()` (or the prefill), so that a caller timing one step
        at a time counts only its own work (the dtype report's speed figures)."""
        mx.eval(*self._next)

    def cached_context(self) -> tuple[list[int], list[Any]]:
        """(tokens, KV cache holding exactly those tokens), for the prefix cache."""
        offset = getattr(self.cache[0], "offset", None) if self.cache else None
        return (self.tokens[:offset], self.cache) if isinstance(offset, int) else ([], [])

    def handoff(self) -> tuple[TokenStep, list[Any], list[int], int]:
        """The queued token, and (KV cache, token context, tokens left) for BatchGenerator.insert:
        that token is the batch's first input, so the batch goes on where this stream stopped."""
        step = self.step(queue_next=False)
        return step, self.cache, self.tokens[:-1], self.max_tokens - self.generated
