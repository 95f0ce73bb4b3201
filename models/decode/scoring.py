"""Prompt scoring: the log-probability of each prompt token given the tokens before it (OpenAI's
`echo` + `logprobs`, vLLM's `prompt_logprobs`, lm-eval's log-likelihood requests).

Contract:
- `score_batch(model, rows, top)` runs one forward pass per group of rows (right-padded: the causal
  mask hides the padding from every real position, so a row's numbers do not depend on its batch
  mates) and returns, per row, one `PositionScore` per prompt token after the first (the first token
  has no context, so no score), in float32 from the log-softmax of the model's logits.
- A row may start from a KV cache of its first `cached` tokens (a prefix cache hit); then only the
  positions after it are computed and the caller supplies the earlier ones (see `ScoreMemo`).
- Every row comes back with a KV cache of exactly its tokens (for the prefix cache), where the model's
  caches are plain KV caches (else None).
- Logits are at most MAX_LOGIT_ELEMENTS per forward: longer prompts are scored in chunks.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache

from models.decode.prefill import paddable

MAX_LOGIT_ELEMENTS = 1 << 25  # 128 MiB of float32 logits per forward pass
MEMO_ENTRIES = 64  # scored prompts kept per variant and scope (their positions' numbers, not logits)


@dataclass(frozen=True)
class PositionScore:
    """The score of one prompt token: its logprob (None if not finite), its rank among the vocabulary
    (1: the most likely), and the `top` most likely tokens as (id, logprob) pairs, best first."""

    token: int
    logprob: float | None
    rank: int
    top: tuple[tuple[int, float | None], ...] = ()


@dataclass
class ScoreRow:
    """One prompt to score: `tokens` (at least one), and optionally a KV cache of its first `cached`."""

    tokens: list[int]
    cache: list[Any] | None = None
    cached: int = 0


@dataclass
class ScoredRow:
    positions: list[PositionScore]  # positions cached+1 .. len(tokens)-1 (0-based token indices)
    cache: list[Any] | None  # the KV cache of exactly the row's tokens, or None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _scores(logits: mx.array, targets: mx.array, top: int) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """For logits (B, L, V) and the next tokens (B, L): (picked logprob, rank, top ids, top logprobs)."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logprobs, targets[..., None], axis=-1)
    rank = (logprobs > picked).sum(axis=-1) + 1
    if top > 0:
        k = min(top, logprobs.shape[-1])
        ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
        values = mx.take_along_axis(logprobs, ids, axis=-1)
        order = mx.argsort(-values, axis=-1)
        ids, values = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
    else:
        ids = values = mx.zeros(targets.shape + (0,), mx.float32)
    return picked[..., 0], rank, ids, values


def _to_positions(tokens: list[int], picked: list, rank: list, ids: list, values: list) -> list[PositionScore]:
    return [PositionScore(t, _finite(p), int(r), tuple((int(i), _finite(v)) for i, v in zip(ti, tv, strict=True)))
            for t, p, r, ti, tv in zip(tokens, picked, rank, ids, values, strict=True)]


def _row_cache(cache: list[Any], row: int, length: int) -> list[Any]:
    """A one-row KV cache of the first `length` positions of row `row` of a batched plain KV cache."""
    out = []
    for layer in cache:
        one = KVCache()
        keys = mx.contiguous(layer.keys[row:row + 1, :, :length])
        values = mx.contiguous(layer.values[row:row + 1, :, :length])
        one.state = (keys, values, length)
        out.append(one)
    mx.eval([c.keys for c in out] + [c.values for c in out])
    return out


def _score_one(model: Any, row: ScoreRow, top: int, vocab: int) -> ScoredRow:
    """One row, in chunks of at most MAX_LOGIT_ELEMENTS logits, from its cached prefix on."""
    cache = row.cache if row.cache is not None else make_prompt_cache(model)
    chunk = max(1, MAX_LOGIT_ELEMENTS // max(vocab, 1))
    tokens, start = row.tokens, row.cached
    positions: list[PositionScore] = []
    # inputs tokens[start:-1] predict tokens[start+1:]; the last token is fed too, so the cache holds all
    while start < len(tokens):
        end = min(start + chunk, len(tokens))
        logits = model(mx.array(tokens[start:end])[None], cache=cache)
        targets = tokens[start + 1:end + 1]
        n = len(targets)
        if n:
            picked, rank, ids, values = _scores(logits[:, :n], mx.array(targets)[None], top)
            positions += _to_positions(targets, picked[0].tolist(), rank[0].tolist(), ids[0].tolist(),
                                       values[0].tolist())
        else:
            mx.eval([c.state for c in cache])
        start = end
    return ScoredRow(positions, cache if paddable(cache) else None)


def _score_padded(model: Any, rows: list[ScoreRow], top: int) -> list[ScoredRow]:
    """Rows without a cache, in one right-padded forward pass."""
    width = max(len(r.tokens) for r in rows)
    inputs = mx.array([r.tokens + [0] * (width - len(r.tokens)) for r in rows])
    cache = make_prompt_cache(model)
    logits = model(inputs, cache=cache)
    targets = mx.concatenate([inputs[:, 1:], mx.zeros((len(rows), 1), inputs.dtype)], axis=1)
    picked, rank, ids, values = (a.tolist() for a in _scores(logits, targets, top))
    out = []
    for i, r in enumerate(rows):
        n = len(r.tokens) - 1
        positions = _to_positions(r.tokens[1:], picked[i][:n], rank[i][:n], ids[i][:n], values[i][:n])
        out.append(ScoredRow(positions, _row_cache(cache, i, len(r.tokens))))
    return out


def score_batch(model: Any, rows: list[ScoreRow], top: int, vocab: int) -> list[ScoredRow]:
    """Score every row (see the module's contract); `top`: how many of the most likely tokens to list
    at each position; `vocab`: the logits' width (it bounds the rows batched together)."""
    results: dict[int, ScoredRow] = {}
    batchable = paddable(make_prompt_cache(model))  # right padding is exact only for plain KV caches
    group: list[int] = []
    width = 0

    def run_group() -> None:
        if len(group) == 1:
            results[group[0]] = _score_one(model, rows[group[0]], top, vocab)
        elif group:
            for i, scored in zip(group, _score_padded(model, [rows[i] for i in group], top), strict=True):
                results[i] = scored
        group.clear()

    fresh = sorted((i for i, r in enumerate(rows) if r.cache is None), key=lambda i: len(rows[i].tokens))
    for i in fresh:  # similar lengths together: less padding
        longest = max(width, len(rows[i].tokens))
        if not batchable or (group and longest * (len(group) + 1) * vocab > MAX_LOGIT_ELEMENTS):
            run_group()
            longest = len(rows[i].tokens)
        group.append(i)
        width = longest
    run_group()
    for i, r in enumerate(rows):
        if r.cache is not None:
            results[i] = _score_one(model, r, top, vocab)
    return [results[i] for i in range(len(rows))]


class ScoreMemo:
    """The position scores of recently scored prompts, per scope: a prompt that shares a prefix with one
    of them (lm-eval's many continuations of one context) takes the prefix's scores from here and has
    only the rest computed, from the prefix cache's KV. A position's score depends only on the tokens
    up to it, so a shared prefix of c tokens gives the scores of its positions 1..c-1."""

    def __init__(self, entries: int = MEMO_ENTRIES) -> None:
        self.entries = entries
        self._memo: OrderedDict[tuple[str, tuple[int, ...]], tuple[int, list[PositionScore]]] = OrderedDict()

    def store(self, scope: str, tokens: list[int], top: int, positions: list[PositionScore]) -> None:
        """`positions`: the scores of tokens[1:], computed with `top` alternatives each."""
        key = (scope, tuple(tokens))
        self._memo[key] = (top, positions)
        self._memo.move_to_end(key)
        while len(self._memo) > self.entries:
            self._memo.popitem(last=False)

    def known(self, scope: str, tokens: list[int], top: int) -> tuple[int, list[PositionScore]]:
        """(c, scores of tokens[1:c]) from the stored prompt sharing the longest prefix c with `tokens`
        (scored with at least `top` alternatives, cut to `top`); (0, []) if none."""
        best, best_key = 0, None
        for key, (stored_top, _) in self._memo.items():
            if key[0] != scope or stored_top < top:
                continue
            shared = _common_prefix(key[1], tokens)
            if shared > best:
                best, best_key = shared, key
        if best_key is None or best < 2:
            return 0, []
        self._memo.move_to_end(best_key)
        positions = self._memo[best_key][1][:best - 1]
        return best, [PositionScore(p.token, p.logprob, p.rank, p.top[:top]) for p in positions]

    def clear(self) -> None:
        self._memo.clear()


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class ScoreRequest:
    """One prompt to score for `scope` with `top` alternatives per position."""

    tokens: list[int]
    top: int
    scope: str = ""


def score_prompts(model: Any, vocab: int, prefix: Any, memo: ScoreMemo,
                  requests: list[ScoreRequest]) -> list[tuple[list[PositionScore], int]]:
    """Score requests for one variant together: per request (scores of tokens[1:], prompt tokens reused).

    A request whose prompt shares a prefix with one scored before in its scope starts from the prefix
    cache's KV (`prefix`: a models.decode.prefix_cache.PrefixCache) and takes that prefix's scores from
    `memo`; the others go through one padded forward pass. Every prompt's KV is stored in the prefix
    cache afterwards, so a generation that follows it (or a prompt sharing its context) prefills less."""
    top = max((r.top for r in requests), default=0)
    rows, known = [], []
    for r in requests:
        shared, scores = memo.known(r.scope, r.tokens, top)
        cache, reused = prefix.fetch(r.tokens, r.scope) if shared else (None, 0)
        start = min(reused, shared - 1)
        if cache is not None and start < reused:
            trim_prompt_cache(cache, reused - start)
        if cache is None or start < 1:
            cache, start = None, 0
        rows.append(ScoreRow(r.tokens, cache, start))
        known.append(scores[:start])
    results = []
    for r, row, before, scored in zip(requests, rows, known, score_batch(model, rows, top, vocab), strict=True):
        positions = before + scored.positions
        memo.store(r.scope, r.tokens, top, positions)
        if scored.cache is not None:
            prefix.store(r.tokens, scored.cache, r.scope)
        results.append(([PositionScore(p.token, p.logprob, p.rank, p.top[:r.top]) for p in positions], row.cached))
    return results
