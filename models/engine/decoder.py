"""The scheduler's `Decoder` over MLX for one variant: its lone stream and its batch, and the prefix cache
that their finished or removed sequences feed."""

from __future__ import annotations

import gc
import itertools
from typing import Any

import mlx.core as mx

from models.api import WorkerStats
from models.decode.single_stream import SingleStream
from models.engine.sequence import Sequence
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from models.mlx_lm_ext.internals import no_stop_sequences
from models.weights.registry import Variant


class MLXDecoder:
    """models.engine.scheduler.Decoder for `variant`: a SingleStream while one request decodes alone,
    the variant's LeanBatchGenerator (`variant.generator`, made on first use) for the batch."""

    def __init__(self, variant: Variant, lone_uids: itertools.count, *, max_batch_size: int, pad_prefill: bool,
                 check_every: int, stats: WorkerStats) -> None:
        self.variant = variant
        self.lone_uids = lone_uids  # negative: never a batch uid
        self.max_batch_size = max_batch_size
        self.pad_prefill = pad_prefill
        self.check_every = check_every
        self.stats = stats
        self.single: SingleStream | None = None
        self._handed_off: tuple[int, list, list[int], int] | None = None  # (token, cache, context, tokens left)

    def start_lone(self, seq: Sequence) -> int:
        params, loaded = seq.params, self.variant.loaded
        stop_ids = set() if params.ignore_eos else set(loaded.tokenizer.eos_token_ids)
        uid = next(self.lone_uids)
        cache, seq.prompt_cache = seq.prompt_cache, None
        self.single = SingleStream(loaded.model, seq.tokens, seq.max_tokens, seq.sampler, seq.processors, stop_ids,
                                   uid, cache=cache, cached=seq.cached_tokens, pad_prefill=self.pad_prefill,
                                   logprobs=_reads_logprobs(seq), check_every=self.check_every,
                                   kv=self.variant.kv)
        return uid

    def insert(self, seq: Sequence) -> int:
        cache, seq.prompt_cache = seq.prompt_cache, None
        cached = seq.cached_tokens
        return self._insert(seq, seq.tokens[cached:], seq.max_tokens, cache, seq.tokens[:cached])

    def step_lone(self) -> Any:
        return self.single.step()

    def step_batch(self, beside_lone: bool) -> list:
        generator = self.variant.generator
        if beside_lone:
            return generator.next()[1]
        unmasked = generator.unmasked_steps
        responses = generator.next()[1]
        self.stats.unmasked_steps += generator.unmasked_steps - unmasked
        return responses

    @property
    def holding(self) -> bool:
        """Whether a queued step waits for start_held (the one after first tokens)."""
        generator = self.variant.generator
        return (self.single is not None and self.single.holding) or (generator is not None and generator.holding)

    def start_held(self) -> None:
        if self.single is not None:
            self.single.start_held()
        if self.variant.generator is not None:
            self.variant.generator.start_held()

    def hand_off(self) -> Any:
        single, self.single = self.single, None
        step, cache, context, left = single.handoff()
        self._handed_off = (step.token, cache, context, left)
        return step

    def rejoin(self, seq: Sequence) -> int:
        (token, cache, context, left), self._handed_off = self._handed_off, None
        return self._insert(seq, [token], left, cache, context)

    def retire_lone(self, seq: Sequence) -> None:
        single, self.single = self.single, None
        self.variant.prefix.store(*single.cached_context(), seq.params.cache_scope)

    def remove(self, seq: Sequence) -> None:
        if self.variant.generator is None:
            return
        for cache, tokens in self.variant.generator.remove([seq.uid], return_prompt_caches=True).values():
            self.variant.prefix.store(tokens, cache, seq.params.cache_scope)

    def reset(self) -> None:
        self.variant.generator = self.single = None
        self._handed_off = None
        gc.collect()
        mx.clear_cache()

    def _insert(self, seq: Sequence, prompt: list[int], max_tokens: int, cache: list | None,
                context: list[int]) -> int:
        """Add a sequence to the batch: `cache` holds the keys and values of `context`."""
        return self._batch().insert(
            [prompt], max_tokens=[max_tokens], caches=[cache], all_tokens=[context], samplers=[seq.sampler],
            logits_processors=[seq.processors],
            stop_sequences=no_stop_sequences() if seq.params.ignore_eos else None)[0]

    def _batch(self) -> LeanBatchGenerator:
        variant = self.variant
        if variant.generator is None:
            tokenizer = variant.loaded.tokenizer
            variant.generator = LeanBatchGenerator(
                variant.loaded.model, reads_logprobs=lambda uid: _reads_logprobs(variant.jobs.get(uid)),
                check_every=self.check_every, kv=variant.kv,
                stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
                completion_batch_size=self.max_batch_size,
                prefill_batch_size=min(8, self.max_batch_size))
        return variant.generator


def _reads_logprobs(seq: Sequence | None) -> bool:
    """Its rows' logits must be normalized (models.decode.step_rules)."""
    return seq is not None and seq.params.logprobs is not None
