"""mlx-lm's BatchGenerator with one step skipped where nobody needs it: normalizing the logits.

mlx-lm turns every decode step's logits into log-probabilities (a log-sum-exp over the whole
vocabulary) before sampling. Greedy rows only take the argmax, which the normalization does not
move, and the logprobs themselves are read only by requests that ask for them. On a CPU that
log-sum-exp is not small: MLX's CPU exp costs ~17 ns per element, so 8 rows of a 32,000-token
vocabulary take ~6 ms, about an eighth of a llama-25m decode step (BENCHMARKS.md).

So a decode step leaves the logits as they are when every row is greedy (or draws with a sampler
that normalizes by itself, as the CPU's numpy sampler does), no row's request asks for logprobs, and
the logits are float32. The subtraction of the log-sum-exp rounds, and can merge two near-equal
values, so that mlx-lm's argmax picks the first of them: in float32 only values within about a
millionth of each other (the size of the differences that batching itself makes), in bfloat16 and
float16 far more often, so those dtypes keep mlx-lm's step, token for token. A row's first token
(sampled at the end of its prefill) always comes from mlx-lm's own step. The engine's non-finite
check then reads the picked token's logit instead of its logprob.

The step also does that check itself, on the batch's scores as they are (one gather, every
`check_every`-th step and each row's first and last-by-length steps): read with the tokens, it
costs no extra round trip, where stacking the rows' scores afterwards cost a copy of them all.
Each response carries `finite` (True where unchecked).

Two steps are not started as mlx-lm starts them. When every row ends by length with the tokens being
returned, no step follows (it would hold the device, and the next requests' admission, for a step nobody
reads); the finished rows' caches then hold all their tokens but the last, and their `all_tokens` say so.
The step after rows' first tokens is held until the owner calls `start_held`, once it has sent them:
MLX's dispatch of a step returns only when the device nears its end, so dispatched at once it would hold
those tokens back by about half a step (their time to first token).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import KVCache

from models.decode.step_rules import needs_logprobs, picked_finite
from models.mlx_lm_ext.batch_cache import MovingPromptBatch, merge_caches
from models.mlx_lm_ext.contract import GENERATION_BATCH_ATTRIBUTES
from models.mlx_lm_ext.decode_mask import unmask_unpadded
from models.mlx_lm_ext.quantized_batch_cache import merge_quantized, quantize_layers

log = logging.getLogger(__name__)


class LeanGenerationBatch(GenerationBatch):
    """A GenerationBatch whose step normalizes the logits only when some row needs it, and checks
    the picked tokens' scores for non-finite values.

    `reads_logprobs(uid)` (set by the owner) says whether a sequence's request reads logprobs;
    `check_every`: steps between non-finite checks (1: every step)."""

    reads_logprobs: Callable[[int], bool]
    check_every: int = 1
    kv: tuple[int, int] | None = None  # (group size, bits) of a quantized KV cache; None: float
    _steps = 0
    unmasked_steps = 0  # steps whose attention had no mask (models.mlx_lm_ext.decode_mask: no row padded)
    _next_finite: mx.array | None = None  # (rows, 1) bool for the queued step, None if unchecked
    _current_finite: list[bool] | None = None
    queued_next = True  # whether the last step queued the one after it (not when every row ended by length)
    held: list | None = None  # a queued step not started yet (start_held)

    def _step(self) -> tuple[list[int], list[mx.array]]:
        # The contract of GenerationBatch._step (mlx-lm 0.32): queue the next step, then return the
        # tokens and scores of the current one (computed by the previous call).
        self._current_tokens, self._current_logprobs = self._next_tokens, self._next_logprobs
        current_finite = self._next_finite
        inputs = self._current_tokens
        self.held = None  # unstarted, it runs with the step queued now (or as its tokens are read)
        self.queued_next = not self._all_end_by_length()
        pending = self._build(inputs) if self.queued_next else []
        if not self.queued_next:
            self._next_tokens, self._next_logprobs, self._next_finite = None, [], None
        if pending and any(n == 0 for n in self._num_tokens):
            self.held = pending
        elif pending:
            mx.async_eval(*pending)
        tokens = inputs.tolist()
        self._current_finite = None if current_finite is None else [f[0] for f in current_finite.tolist()]
        for sequence, token in zip(self.tokens, tokens, strict=True):
            sequence.append(token)
        return tokens, self._current_logprobs

    def start_held(self) -> None:
        """Start the queued step if it was held (unstarted, it runs when its tokens are read)."""
        held, self.held = self.held, None
        if held:
            mx.async_eval(*held)

    def _build(self, inputs: mx.array) -> list:
        """Build the step that takes `inputs` (queued as the next one); the arrays that start it."""
        logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
        self.unmasked_steps += getattr(self.prompt_cache[0], "last_unmasked", False)
        logits, contexts = self._apply_processors(inputs, logits)
        samplers = [self.fallback_sampler if s is None else s for s in (self.samplers or [None] * len(self.uids))]
        if needs_logprobs(logits.dtype, samplers, any(map(self.reads_logprobs, self.uids))):
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self._next_tokens = self._sample(samplers, logits)
        self._steps += 1
        self._next_finite = picked_finite(logits, self._next_tokens) if self._checks_next() else None
        self._next_logprobs = list(logits)  # views of `logits`: evaluated only if someone reads them
        return [self._next_tokens, logits, contexts, *[f for f in (self._next_finite,) if f is not None]]

    def _all_end_by_length(self) -> bool:
        """Whether every row ends by length with the token being returned (mlx-lm's next() counts it)."""
        return all(n + 1 >= m for n, m in zip(self._num_tokens, self.max_tokens, strict=True))

    def _checks_next(self) -> bool:
        """Whether the step being queued is checked: every `check_every`-th, and the last of any row
        that ends by length (its request's warnings must be known when it finishes)."""
        return self._steps % self.check_every == 0 or any(
            n + 2 >= m for n, m in zip(self._num_tokens, self.max_tokens, strict=True))

    def next(self) -> list:
        responses = super().next()
        flags = self._current_finite or [True] * len(responses)
        for response, finite in zip(responses, flags, strict=False):
            response.finite = finite
            if not self.queued_next and response.prompt_cache:  # its cache lacks the last token's keys
                response.all_tokens = response.all_tokens[:-1]
        return responses

    def extend(self, batch: GenerationBatch) -> None:
        # New rows' first tokens (sampled by mlx-lm's own step) are checked as they join.
        rows = len(self.uids)
        joining = picked_finite(mx.stack(batch._next_logprobs), batch._next_tokens) \
            if batch._next_tokens is not None and batch._next_logprobs else None
        if self.kv is not None:  # rows that joined without a prefill chunk still hold float keys
            quantize_layers(batch.prompt_cache, *self.kv)
        super().extend(batch)
        unmask_unpadded(self.prompt_cache)
        if not rows:
            self._next_finite = joining
        elif joining is not None:
            mine = self._next_finite if self._next_finite is not None else mx.ones((rows, 1), mx.bool_)
            self._next_finite = mx.concatenate([mine, joining])

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        if self._next_finite is not None:
            self._next_finite = self._next_finite[mx.array(keep)] if keep else None

    def _apply_processors(self, inputs: mx.array, logits: mx.array) -> tuple[mx.array, list[mx.array]]:
        """Each row through its own logits processors (penalties, biases), with its token context."""
        if not any(self.logits_processors or ()):
            return logits, []
        rows, contexts = [], []
        for i, processors in enumerate(self.logits_processors):
            row = logits[i : i + 1]
            if processors:
                context = self._token_context[i].update_and_fetch(inputs[i : i + 1])
                contexts.append(context)
                for processor in processors:
                    row = processor(context, row)
            rows.append(row)
        return mx.concatenate(rows, axis=0), contexts

    @staticmethod
    def _sample(samplers: list, scores: mx.array) -> mx.array:
        """One call for rows that share a sampler (the common case), else row by row."""
        if all(s is samplers[0] for s in samplers):
            return samplers[0](scores)
        return mx.concatenate([s(scores[i : i + 1]) for i, s in enumerate(samplers)], axis=0)


# The tokens of mlx-lm's widest prefill step by default (8 rows of prefill_step_size): a step may take more
# rows than prefill_batch_size while their tokens stay within it.
PREFILL_TOKENS = 8 * 2048


class LeanBatchGenerator(BatchGenerator):
    """BatchGenerator decoding in a LeanGenerationBatch, whose prefill steps take as many short prompts as fit
    (so a burst starts decoding together). `reads_logprobs(uid)`: whether that sequence's request reads
    logprobs (its rows, and so the whole batch's, are then normalized); `check_every`: decode steps between
    non-finite checks; `kv`: (group size, bits) to hold every sequence's KV cache quantized
    (models.mlx_lm_ext.quantized_batch_cache), None: in the model's float dtype."""

    def __init__(self, model: Any, reads_logprobs: Callable[[int], bool] = lambda uid: False,
                 check_every: int = 1, kv: tuple[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.kv = kv
        batch = LeanGenerationBatch.empty(self.model, self.sampler)
        batch.reads_logprobs = reads_logprobs
        batch.check_every = check_every
        batch.kv = kv
        missing = [name for name in GENERATION_BATCH_ATTRIBUTES if not hasattr(batch, name)]
        if missing:
            log.warning("mlx-lm's GenerationBatch lacks %s: decoding with its own step", ", ".join(missing))
        else:
            self._generation_batch = batch  # new sequences are merged into it (extend), so it stays lean
        # Reused caches join without extra copies (models.mlx_lm_ext.batch_cache), where mlx-lm is the one expected.
        self._moves = isinstance(getattr(self, "_unprocessed_sequences", None), deque) and \
            type(getattr(self, "_prompt_batch", None)) is PromptProcessingBatch
        if self._moves:
            self._prompt_batch = MovingPromptBatch.empty(
                self.model, self.sampler, prefill_step_size=self._prompt_batch.prefill_step_size)
            self._prompt_batch.kv = kv
        elif kv is not None:
            raise ValueError("a quantized KV cache in the batch needs mlx-lm's prompt batch (models.mlx_lm_ext)")
        self._prefill_rows_min = self.prefill_batch_size

    def _next(self) -> Any:
        # mlx-lm 0.32's round (a decode step, then a prefill step), which next() and next_generated() call
        if self._moves:
            self.prefill_batch_size = self._prefill_rows()
        return super()._next()

    def _prefill_rows(self) -> int:
        """Rows for the next prefill step: the configured number, or more while their tokens fit in
        PREFILL_TOKENS. A burst of short or cached prompts then starts decoding together; taken 8 at a
        time, each later 8 joined a step behind, padded, and padding keeps the attention mask
        (models.mlx_lm_ext.decode_mask) for as long as they decode."""
        step = self._prompt_batch.prefill_step_size
        rows, tokens = len(self._prompt_batch), 0
        for sequence in self._unprocessed_sequences:  # mlx-lm's: (uid, segments, ...)
            need = min(sum(len(segment) for segment in sequence[1]), step)
            if rows >= self._prefill_rows_min and tokens + need > PREFILL_TOKENS:
                break
            rows, tokens = rows + 1, tokens + need
        return max(rows, self._prefill_rows_min)

    @property
    def holding(self) -> bool:
        return getattr(self._generation_batch, "held", None) is not None

    def start_held(self) -> None:
        """Start the decode step the last `next()` queued but held back (rows' first tokens were read)."""
        start = getattr(self._generation_batch, "start_held", None)
        if start is not None:
            start()

    def sync(self) -> None:
        """Wait for the decode step queued by the last `next()`, so that a caller timing one step at a time
        counts only its own work (the dtype report's speed figures)."""
        queued = getattr(self._generation_batch, "_next_tokens", None)
        if queued is not None:
            mx.eval(queued)

    @property
    def unmasked_steps(self) -> int:
        """Decode steps so far whose attention ran without a mask (no row padded)."""
        return getattr(self._generation_batch, "unmasked_steps", 0)

    def _make_batch(self, n: int) -> PromptProcessingBatch:
        # mlx-lm's queued sequence: (uid, segments, max_tokens, caches, ...)
        queued = [self._unprocessed_sequences[i] for i in range(n)]
        joining = [q[3] for q in queued] if self._moves else []
        # what the batch can write: its longest prompt rest, then its longest generation
        writes = max((sum(map(len, q[1])) for q in queued), default=0) + max((q[2] for q in queued), default=0)
        merged = merge_quantized(joining, *self.kv) if self.kv is not None else None
        if merged is not None:  # mlx-lm cannot merge quantized caches: it merges empty ones, replaced below
            for i, q in enumerate(queued):
                self._unprocessed_sequences[i] = (*q[:3], [KVCache() for _ in q[3]], *q[4:])
        batch = super()._make_batch(n)
        merged = merged or merge_caches(joining, writes)
        if merged is not None:
            batch.prompt_cache = merged  # replaces mlx-lm's merge before anything evaluates it
        return batch
