"""Per-request samplers. A seeded sampler owns its PRNG key, so its draws do not depend on
which other requests share the batch."""

from __future__ import annotations

import random
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

Sampler = Callable[[mx.array], mx.array]


def make_request_sampler(temperature: float, top_p: float, seed: int | None) -> Sampler | None:
    """None means greedy (the batch's shared argmax sampler)."""
    if temperature <= 0:
        return None
    key = mx.random.key(seed if seed is not None else random.getrandbits(63))
    state = [key]

    def sample(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        state[0], draw = mx.random.split(state[0])
        return mx.random.categorical(logprobs * (1.0 / temperature), key=draw)

    return sample
