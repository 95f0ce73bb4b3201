"""Prompt scoring on the engine's worker (models.decode.scoring does the computation): `MLXEngine.score`,
and the worker's batching of the scoring calls that it pulled off its queue together.

A scoring request reaches the worker as an ordinary `Call` whose function is a `ScoreCall`; the worker takes
those out of each iteration's commands and scores them one padded batch per variant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.api import GenerationParams, PromptScores, TokenLogprob
from models.decode.scoring import ScoreMemo, ScoreRequest, score_prompts
from models.errors import EngineError, GenerationFailedError

if TYPE_CHECKING:
    from models.weights.registry import Variant

log = logging.getLogger(__name__)
# Prompt tokens scored per worker iteration (at least one request): more wait for the next, so that
# scoring bursts let decode steps in between.
SCORE_TOKENS_PER_STEP = 4096


class Scorer:
    """Scores prompts on the worker, one padded batch per variant (models.decode.scoring computes)."""

    def __init__(self, registry: Any, encoder: Callable[[Variant], Any], default_model: str) -> None:
        self.registry = registry
        self.encoder = encoder  # a variant's PromptEncoder (models.engine.serving.Serving.encoder)
        self.default_model = default_model
        self._memos: dict = {}  # per variant: recent prompt scores

    def call(self, params: GenerationParams, tokens: list[int] | None) -> ScoreCall:
        """A scoring request for the worker: batched with others (take_score_calls), or run alone."""
        return ScoreCall(self, params, tokens)

    def scored(self, calls: list[ScoreCall]) -> list[tuple[Any, EngineError | None]]:
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
                results = score_prompts(variant.loaded.model, _vocab(variant), variant.prefix,
                                        self._memo(variant), requests)
            except Exception as e:  # e.g. out of memory: fail these requests, keep the engine
                log.exception("scoring failed on %s/%s", *variant.key)
                for n, *_ in group:
                    answers[n] = (None, GenerationFailedError(f"scoring failed: {type(e).__name__}"))
                continue
            variant.last_used = time.time()
            for (n, _, tokens, _), result in zip(group, results, strict=True):
                answers[n] = ((variant, tokens, *result), None)
        return answers

    def _memo(self, variant: Variant) -> ScoreMemo:
        """The variant's memo of recent prompt scores (a new one when the variant was reloaded)."""
        owner, memo = self._memos.get(variant.key, (None, None))
        if owner is not variant or memo is None:
            memo = ScoreMemo()
            self._memos[variant.key] = (variant, memo)
        return memo


def take_score_calls(calls: list, max_batch: int) -> tuple[list, list]:
    """Split pulled scoring commands (each with `.fn` a ScoreCall) into those scored this iteration (up to
    `max_batch` and SCORE_TOKENS_PER_STEP prompt tokens, at least one) and those put back on the queue."""
    taken, later, tokens = [], [], 0
    for command in calls:
        size = len(command.fn.tokens or ())
        if taken and (len(taken) >= max_batch or tokens + size > SCORE_TOKENS_PER_STEP):
            later.append(command)
        else:
            taken.append(command)
            tokens += size
    return taken, later


def prompt_scores(variant: Variant, tokens: list[int], positions: list, cached: int) -> PromptScores:
    """The scores as plain values, with each token's text (on a tokenizing thread)."""
    tokenizer = variant.loaded.tokenizer
    text = {t: tokenizer.decode([t]) for t in {*tokens, *(i for p in positions for i, _ in p.top)}}
    first = TokenLogprob(text[tokens[0]], None, token_id=tokens[0])
    rest = tuple(TokenLogprob(text[p.token], p.logprob, tuple((text[i], v) for i, v in p.top), token_id=p.token,
                              rank=p.rank, top_ids=tuple(i for i, _ in p.top)) for p in positions)
    loaded = variant.loaded
    return PromptScores(loaded.name, loaded.dtype, loaded.float_dtype, (first, *rest), cached)


def _vocab(variant: Variant) -> int:
    return variant.loaded.config.get("vocab_size") or len(variant.loaded.tokenizer.get_vocab())


@dataclass(eq=False)
class ScoreCall:
    """A scoring request on its way to the worker: run in a batch (take_score_calls), or alone."""

    scorer: Scorer
    params: GenerationParams
    tokens: list[int] | None  # encoded off the worker when its model's tokenizer was known

    def admit(self) -> tuple[Variant, list[int]]:
        """Its variant (loaded if need be) and prompt tokens, checked against the context (worker thread)."""
        params = self.params
        variant = self.scorer.registry.get(params.model or self.scorer.default_model, params.dtype)
        encoder = self.scorer.encoder(variant)
        tokens = self.tokens if self.tokens is not None else encoder.encode(params)
        encoder.check_fits(tokens, params.max_tokens or 0)
        return variant, tokens

    def __call__(self) -> tuple:
        """Scored alone, where it reaches the worker as a plain call."""
        value, error = self.scorer.scored([self])[0]
        if error is not None:
            raise error
        return value
