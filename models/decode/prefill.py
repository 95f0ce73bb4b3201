"""Prompt prefill in a few fixed shapes, where the device pays for every new one.

MLX's CUDA backend sets up its matrix multiplications per shape (cuBLASLt plans): the first prompt
of a length never seen before waits 15-25 ms more on an H200 (`bench.shape_costs`). Padding the
last prefill chunk to one of a few bucket lengths, and running each bucket once at start-up
(models.decode.warmup), leaves no new shapes for real prompts. The padding sits after the prompt, so the
causal mask hides it from every prompt token, and the KV cache is trimmed back before decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

# at most half again the prompt's length: the padding costs little next to a new shape's setup
BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
CHUNK = BUCKETS[-1]  # longer prompts go in chunks of this size (one shape), then a bucketed rest


def shapes_cost() -> bool:
    """Whether new shapes cost set-up time on this device (CUDA; not the CPU, not Metal)."""
    cuda = getattr(mx, "cuda", None)  # not in every MLX build
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def bucket(length: int) -> int:
    return next((b for b in BUCKETS if b >= length), length)


def paddable(cache: list[Any]) -> bool:
    """Only a plain KV cache can be trimmed back exactly (not sliding-window or state caches)."""
    return bool(cache) and all(type(c) is KVCache for c in cache)


def prefill(model: Any, tokens: mx.array, cache: list[Any], pad: bool,
            after_chunk: Callable[[list[Any]], None] | None = None) -> None:
    """Run `tokens` (1-D) through the model into `cache`; `pad`: in bucket-shaped chunks; `after_chunk(cache)`
    after each chunk (a quantized KV cache is quantized there, as mlx_lm.generate does)."""
    pad = pad and paddable(cache)
    while tokens.size:
        n = min(CHUNK, tokens.size)
        chunk, extra = tokens[:n], (bucket(n) - n if pad else 0)
        if extra:
            chunk = mx.concatenate([chunk, mx.zeros((extra,), chunk.dtype)])
        model(chunk[None], cache=cache)
        if extra:
            for c in cache:
                c.trim(extra)
        if after_chunk is not None:
            after_chunk(cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
