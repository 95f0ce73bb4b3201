"""Start-up runs of every shape real traffic will use, where new shapes cost set-up time (CUDA).

Prompts run through the same code as requests (padded prefill, first decode step of a lone stream)
on the generation stream, so that a real request differs from the warm-up only in its token values.
(On an H200 the first real prefill took 2-13x the steady one however it was warmed: it ran after a
reused 1-token prefix, a shape no warm-up runs. With models.decode.prefix_cache.MIN_REUSE it measured
0.97-1.09x steady there.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import make_prompt_cache

from models.decode.prefill import BUCKETS
from models.decode.sampling import make_request_sampler
from models.decode.single_stream import SingleStream


def warm_variant(model: Any, context: int, max_batch: int, pad_prefill: bool,
                 between: Callable[[], None] | None = None) -> None:
    """Warm a variant loaded at run time: every shape where shapes cost set-up time, else one short
    prefill and decode step of a lone request and one decode step of a batch of two. `between` runs
    after each of them (the engine decodes for the variants already serving)."""
    if pad_prefill:
        warm_shapes(model, context, max_batch)
        return
    SingleStream(model, [0] * min(9, max(context - 2, 2)), 1, None, [], set(), 0).step()
    if between is not None:
        between()
    with mx.stream(generation_stream):
        mx.eval(model(mx.zeros((min(2, max_batch), 1), mx.int32), cache=make_prompt_cache(model)))


def warm_shapes(model: Any, context: int, max_batch: int) -> int:
    """Prefill every bucket (padded and exactly full) and its first decode step as a lone request
    does, and one decode step at each batch size; the number of shapes run."""
    shapes = 0
    for size in (b for b in BUCKETS if b + 1 < context):
        for length in sorted({max(size - 1, 1), size}):  # prefill tokens: padded to `size`, or exactly it
            SingleStream(model, [0] * (length + 1), 1, None, [], set(), 0, pad_prefill=True).step()
            shapes += 1
    with mx.stream(generation_stream):
        for batch in range(1, max_batch + 1):
            cache = make_prompt_cache(model)
            mx.eval(model(mx.zeros((batch, 1), mx.int32), cache=cache))
            shapes += 1
    return shapes


def warm_sampling() -> None:
    """Build the fused kernels of a temperature draw (models.decode.sampling) for one row and for a batch's
    rows drawn together (their own kernels: rows broadcast against their totals); any vocabulary size."""
    sampler = make_request_sampler(1.0, 1.0, 0)
    for rows in (1, 2):
        mx.eval(sampler(mx.zeros((rows, 8))))
