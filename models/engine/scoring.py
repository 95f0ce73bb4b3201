"""Prompt scoring on the engine's worker (models.decode.scoring does the computation): `MLXEngine.score`,
and the worker's batching of the scoring calls that it pulled off its queue together.

A scoring request reaches the worker as an ordinary call (`_call`) whose function is a `_ScoreCall`; the
worker takes those out of each iteration's commands and scores them one padded batch per variant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.api import GenerationParams, PromptScores, TokenLogprob
from models.decode.scoring import ScoreMemo, ScoreRequest, score_prompts
from models.errors import EngineError, GenerationFailedError

if TYPE_CHECKING:
    from models.engine.core import MLXEngine
    from models.weights.registry import Variant

log = logging.getLogger(__name__)
# Prompt tokens scored per worker iteration (at least one request): more wait for the next, so that
# scoring bursts let decode steps in between.
SCORE_TOKENS_PER_STEP = 4096


class ScoringMixin:
    """MLXEngine's scoring methods (they use its registry, encoders, queue and `_call`)."""

    async def score(self, params: GenerationParams) -> PromptScores:
        """Each prompt token's logprob given the tokens before it, with its top `params.prompt_logprobs`
        alternatives (the first token's logprob is None). Requests that reach the worker together are
        scored in one padded forward pass per variant; the prompt fits the context with `max_tokens` more."""
        self._ensure_alive()
        tokens = await self._encode_off_worker(params)
        variant, tokens, positions, cached = await self._call(_ScoreCall(self, params, tokens))
        return await self._on_tokenizing_thread(_prompt_scores, variant, tokens, positions, cached)

    def _score_together(self, commands: list) -> None:
        """Run the scoring calls among the worker's pulled `commands` as batches (up to max_batch_size and
        SCORE_TOKENS_PER_STEP tokens this iteration; the rest go back to the queue)."""
        if any(not isinstance(c, tuple) for c in commands):  # the stop sentinel: _fail_all answers them
            return
        calls = [c for c in commands if c[0] == "call" and isinstance(c[1][0], _ScoreCall)]
        if not calls:
            return
        taken, tokens = [], 0
        for command in calls:
            commands.remove(command)
            size = len(command[1][0].tokens or ())
            if taken and (len(taken) >= self.max_batch_size or tokens + size > SCORE_TOKENS_PER_STEP):
                self._commands.put(command)
            else:
                taken.append(command[1])
                tokens += size
        self._score_calls(taken)

    def _score_calls(self, calls: list[tuple]) -> None:
        """Score (call, loop, future) triples and answer each future."""
        for (_, loop, future), (value, error) in zip(calls, self._scored([c for c, _, _ in calls]), strict=True):
            loop.call_soon_threadsafe(_settle, future, value, error)

    def _scored(self, calls: list[_ScoreCall]) -> list[tuple[Any, EngineError | None]]:
        """(result, error) per call, one batch per variant; a failure answers only its own calls."""
        answers: list[tuple[Any, EngineError | None]] = [(None, None)] * len(calls)
        groups: dict[tuple, list] = {}
        for n, call in enumerate(calls):
            try:
                variant, tokens = call.admit()
            except EngineError as e:
                answers[n] = (None, e)
                continue
            except Exception as e:
                log.exception("admitting a scoring request failed")
                answers[n] = (None, GenerationFailedError(f"internal error: {type(e).__name__}"))
                continue
            groups.setdefault(variant.key, []).append((n, variant, tokens, call))
        for group in groups.values():
            variant = group[0][1]
            requests = [ScoreRequest(tokens, call.params.prompt_logprobs, call.params.cache_scope)
                        for _, _, tokens, call in group]
            try:
                results = score_prompts(variant.loaded.model, self._vocab(variant), variant.prefix,
                                        self._score_memo(variant), requests)
            except Exception as e:  # e.g. out of memory: fail these requests, keep the engine
                log.exception("scoring failed on %s/%s", *variant.key)
                for n, *_ in group:
                    answers[n] = (None, GenerationFailedError(f"scoring failed: {type(e).__name__}"))
                continue
            variant.last_used = time.time()
            for (n, _, tokens, _), result in zip(group, results, strict=True):
                answers[n] = ((variant, tokens, *result), None)
        return answers

    @staticmethod
    def _vocab(variant: Variant) -> int:
        return variant.loaded.config.get("vocab_size") or len(variant.loaded.tokenizer.get_vocab())

    def _score_memo(self, variant: Variant) -> ScoreMemo:
        """The variant's memo of recent prompt scores (a new one when the variant was reloaded)."""
        owner, memo = self._score_memos.get(variant.key, (None, None))
        if owner is not variant or memo is None:
            memo = ScoreMemo()
            self._score_memos[variant.key] = (variant, memo)
        return memo


@dataclass(eq=False)
class _ScoreCall:
    """A scoring request on its way to the worker: run in a batch by `_score_together`, or alone."""

    engine: MLXEngine
    params: GenerationParams
    tokens: list[int] | None  # encoded off the worker when its model's tokenizer was known

    def admit(self) -> tuple[Variant, list[int]]:
        """Its variant (loaded if need be) and prompt tokens, checked against the context (worker thread)."""
        params = self.params
        variant = self.engine.registry.get(params.model or self.engine.default_model, params.dtype)
        encoder = self.engine._encoder(variant)
        tokens = self.tokens if self.tokens is not None else encoder.encode(params)
        encoder.check_fits(tokens, params.max_tokens or 0)
        return variant, tokens

    def __call__(self) -> tuple:
        """Scored alone, where it reaches the worker as a plain call."""
        value, error = self.engine._scored([self])[0]
        if error is not None:
            raise error
        return value


def _prompt_scores(variant: Variant, tokens: list[int], positions: list, cached: int) -> PromptScores:
    """The scores as plain values, with each token's text (on a tokenizing thread)."""
    tokenizer = variant.loaded.tokenizer
    text = {t: tokenizer.decode([t]) for t in {*tokens, *(i for p in positions for i, _ in p.top)}}
    first = TokenLogprob(text[tokens[0]], None, token_id=tokens[0])
    rest = tuple(TokenLogprob(text[p.token], p.logprob, tuple((text[i], v) for i, v in p.top), token_id=p.token,
                              rank=p.rank, top_ids=tuple(i for i, _ in p.top)) for p in positions)
    loaded = variant.loaded
    return PromptScores(loaded.name, loaded.dtype, loaded.float_dtype, (first, *rest), cached)




def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
