"""The KV cache a BatchGenerator holds, row by row, read from its caches' arrays (nothing is evaluated:
an array's nbytes is known from its shape), and how those arrays grow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache

from models.mlx_lm_ext.quantized_batch_cache import QuantizedBatchKVCache

# The caches' buffers grow by this many positions (`step`: 256 in mlx-lm 0.32, ours alike); the largest, should
# they ever differ, so that a reservation is never short
CACHE_STEP = max(KVCache.step, BatchKVCache.step, QuantizedKVCache.step, QuantizedBatchKVCache.step)


def grown_room(room: int, positions: int, step: int = CACHE_STEP) -> int:
    """The positions a cache's buffers have room for once it has written `positions` (a batch row's left
    padding included), from `room` now: mlx-lm's caches and ours grow only when full, by whole steps past
    where they were full (a buffer cut short by a batch's `filter` too), so from empty that is `positions`
    rounded up to the step. Exact for growth token by token (decoding) from any room, and for a cache built
    from empty in chunks that are multiples of the step but the last (prefill's 2,048)."""
    if positions <= room:
        return room
    return room + -(-(positions - room) // step) * step


@dataclass(frozen=True)
class SequenceKV:
    """One sequence's KV cache: `tokens` held, `bytes` of the arrays that hold them (its row's share of a
    batch's buffers: padding and room for the next tokens included), and where it is (`stage`: queued,
    prefill, decode, or lone for a stream outside the batch); `padding`: a batch row's left padding, and
    `room`: the positions its buffers have (a batch's, padding included)."""

    uid: int
    tokens: int
    bytes: int
    stage: str
    padding: int = 0
    room: int = 0


def layer_bytes(cache: Any) -> int:
    """A layer cache's keys and values in bytes (0 while empty: mlx-lm's QuantizedKVCache.nbytes fails then)."""
    return 0 if cache.empty() else int(cache.nbytes)


def layer_room(cache: Any) -> int:
    """The positions a layer cache's buffers have (keys on axis 2; a quantized cache's first part), 0 while empty."""
    keys = getattr(cache, "keys", None)
    if keys is None:
        return 0
    first = keys[0] if isinstance(keys, (tuple, list)) else keys
    return int(first.shape[2])


def lone_tokens(layers: list[Any]) -> int:
    """Tokens a lone sequence's cache holds (its first layer's offset)."""
    return int(getattr(layers[0], "offset", 0)) if layers else 0


def _rows(uids: list[int], layers: list[Any], stage: str) -> list[SequenceKV]:
    if not uids or not layers:
        return []
    total = sum(layer_bytes(c) for c in layers)
    first = layers[0]
    written = int(getattr(first, "_idx", 0))  # the batch's write index; a row holds it less its left padding
    padding = first.left_padding.tolist() if hasattr(first, "left_padding") else [0] * len(uids)
    tokens = [max(written - p, 0) for p in padding]
    room = layer_room(first)
    # every buffer has one slice per row: each row's share is exact
    return [SequenceKV(uid, int(n), total // len(uids), stage, int(p), room)
            for uid, n, p in zip(uids, tokens, padding, strict=True)]


def batch_sequences(generator: Any) -> list[SequenceKV]:
    """Every sequence of a BatchGenerator with its KV cache: queued with a reused cache, in prefill, decoding."""
    out = [SequenceKV(q[0], lone_tokens(q[3]), sum(layer_bytes(c) for c in q[3]), "queued",
                      room=layer_room(q[3][0]) if q[3] else 0)
           for q in getattr(generator, "_unprocessed_sequences", ())]  # mlx-lm's: (uid, segments, max, caches, ...)
    for batch, stage in ((getattr(generator, "_prompt_batch", None), "prefill"),
                         (getattr(generator, "_generation_batch", None), "decode")):
        if batch is not None:
            out += _rows(list(batch.uids), list(batch.prompt_cache or ()), stage)
    return out
