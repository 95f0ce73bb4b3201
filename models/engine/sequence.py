"""Per-request state on the worker: its tokens become text (detokenizer, stop strings, logprobs) and its end."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from models.api import Finished, GenerationParams, TextDelta, TokenLogprob, Usage
from models.text.stop_strings import StopStringMatcher


@dataclass(eq=False)
class Sequence:
    """One request from admission to its last event. The event loop sets `cancelled`; everything else
    is the worker's. Events go to `outbox` (the engine's, flushed once per worker iteration)."""

    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    outbox: list
    tokens: list[int] | None = None  # the prompt's tokens, when encoded before reaching the worker
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    variant: Any = None  # models.weights.registry.Variant, once admitted
    uid: int = -1  # its id in the decoder (negative while it decodes as the lone stream)
    prompt_tokens: int = 0
    max_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prompt_cache: list | None = None  # ...and that KV cache, until the decoder takes it
    completion_tokens: int = 0
    first_token_at: float | None = None
    admitted_at: float | None = None  # when the worker admitted it to its variant (queue time ends)
    detokenizer: Any = None
    matcher: StopStringMatcher | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    sampler: Any = None
    processors: list = field(default_factory=list)
    grammar: Any = None  # its structured-output processor, when compiled before reaching the worker
    warnings: list[str] = field(default_factory=list)
    text_sent: bool = False  # its first text went out (later deltas may wait for the stream interval)

    def emit(self, event: Any) -> None:
        self.outbox.append((self, event))

    def fail(self, error: BaseException) -> None:
        """End it with `error` (the request's answer)."""
        self.done = True
        self.emit(error)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def add_token(self, token: int, finish: str | None, logprob: TokenLogprob | None, now: float) -> str | None:
        """Take one decoded token (`finish`: the decoder's reason, "stop" meaning end-of-sequence: no
        text); emit the text it completes. Returns the finish reason: "stop" where a stop string
        matched (with `finish` None: before the decoder ended it), else `finish`."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.completion_tokens += 1
        if finish != "stop":
            self.detokenizer.add_token(token)
        if logprob is not None:  # given for an end-of-sequence token only where the request asks (eos_logprob)
            self.pending_logprobs.append(logprob)
        if finish:
            self.detokenizer.finalize()
        text, hit = self.matcher.feed(self.detokenizer.last_segment)
        if hit:
            finish = "stop"
        elif finish:
            text += self.matcher.flush()
        if text or (finish and self.pending_logprobs):
            self.emit(TextDelta(text, tuple(self.pending_logprobs)))
            self.pending_logprobs.clear()
        return finish

    def finish(self, reason: str, now: float) -> None:
        """Emit its last event: the reason, usage and timings."""
        self.done = True
        loaded = self.variant.loaded
        first = self.first_token_at or now
        decode_s = now - first
        tokens = self.completion_tokens
        rate = (tokens - 1) / decode_s if decode_s > 0 and tokens > 1 else 0.0
        self.emit(Finished(
            model=loaded.name, dtype=loaded.dtype, finish_reason=reason,
            usage=Usage(self.prompt_tokens, tokens, self.cached_tokens),
            time_to_first_token_s=first - self.arrival, total_s=now - self.arrival,
            decode_tokens_per_second=rate, warnings=tuple(self.warnings), stop_sequence=self.matcher.hit,
            float_dtype=loaded.float_dtype, queue_s=(self.admitted_at or self.arrival) - self.arrival))
