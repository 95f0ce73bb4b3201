"""What a decode step must compute for its rows, the lone stream's and the batch's alike: whether it
normalizes the logits, and the non-finite check of the picked tokens (models.mlx_lm_ext.batch_generator
says why skipping the normalization keeps the tokens)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler


def accepts_logits(sampler: Any) -> bool:
    """Whether `sampler` draws the same from raw logits as from log-probabilities: the argmax, and
    samplers that say so (models.decode.sampling.HostSampler normalizes each row itself)."""
    return sampler is greedy_sampler or getattr(sampler, "accepts_logits", False)


def needs_logprobs(dtype: mx.Dtype, samplers: list, reads_logprobs: bool) -> bool:
    """Whether a step must normalize its logits: 16-bit logits (rounding can tie the argmax), a sampler
    that reads the scores as normalized (mlx-lm's top-p), or a request that reads its logprobs."""
    return dtype != mx.float32 or reads_logprobs or not all(accepts_logits(s) for s in samplers)


def picked_finite(scores: mx.array, tokens: mx.array) -> mx.array:
    """Whether each row's score at its picked token is finite, as a (rows, 1) bool array."""
    return mx.isfinite(mx.take_along_axis(scores, tokens[:, None], axis=-1))
