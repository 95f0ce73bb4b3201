"""The KV cache a BatchGenerator holds, row by row, read from its caches' arrays (nothing is evaluated:
an array's nbytes is known from its shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SequenceKV:
    """One sequence's KV cache: `tokens` held, `bytes` of the arrays that hold them (its row's share of a
    batch's buffers: padding and room for the next tokens included), and where it is (`stage`: queued,
    prefill, decode, or lone for a stream outside the batch)."""

    uid: int
    tokens: int
    bytes: int
    stage: str


def layer_bytes(cache: Any) -> int:
    """A layer cache's keys and values in bytes (0 while empty: mlx-lm's QuantizedKVCache.nbytes fails then)."""
    return 0 if cache.empty() else int(cache.nbytes)


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
    # every buffer has one slice per row: each row's share is exact
    return [SequenceKV(uid, int(n), total // len(uids), stage) for uid, n in zip(uids, tokens, strict=True)]


def batch_sequences(generator: Any) -> list[SequenceKV]:
    """Every sequence of a BatchGenerator with its KV cache: queued with a reused cache, in prefill, decoding."""
    out = [SequenceKV(q[0], lone_tokens(q[3]), sum(layer_bytes(c) for c in q[3]), "queued")
           for q in getattr(generator, "_unprocessed_sequences", ())]  # mlx-lm's: (uid, segments, max, caches, ...)
    for batch, stage in ((getattr(generator, "_prompt_batch", None), "prefill"),
                         (getattr(generator, "_generation_batch", None), "decode")):
        if batch is not None:
            out += _rows(list(batch.uids), list(batch.prompt_cache or ()), stage)
    return out
