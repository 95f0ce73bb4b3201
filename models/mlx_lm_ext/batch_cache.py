"""How sequences with a reused KV cache (models.decode.prefix_cache) join mlx-lm's BatchGenerator, without
copying their caches more often than once.

mlx-lm merges the joining sequences' caches into one BatchKVCache exactly as long as the longest,
so the first decode step after it regrows every layer's buffer (a concatenate); then it deep-copies
the merged cache and gathers its rows when it moves them from prefill to decoding, even when all of
them move. Here the merge leaves room for the next BatchKVCache.step tokens, and a move of every row
hands the caches over as they are: 8 cached prompts of llama-25m reach their first tokens in 172 ms
on this CPU instead of mlx-lm's 245 (a decode step is ~35 ms; `python -m bench.admission`).
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache, KVCache

from models.mlx_lm_ext.quantized_batch_cache import quantize_layers


def merge_with_room(caches: list[KVCache], writes: int | None = None) -> BatchKVCache:
    """BatchKVCache.merge (left-padded to the longest), in buffers with room up to the next whole
    BatchKVCache.step, or for `writes` more positions (what the rows can still write) if fewer."""
    lengths = [c.size() for c in caches]
    longest = max(lengths)
    if longest == 0:
        return BatchKVCache([0] * len(caches))
    sample = next(c for c in caches if c.keys is not None)
    rows, heads = len(caches), sample.keys.shape[1]
    # buffers are new memory, zeroed: each position not written costs its bytes twice (page faults, zeros)
    capacity = (longest // BatchKVCache.step + 1) * BatchKVCache.step
    if writes is not None:
        capacity = min(capacity, longest + max(writes, 1))
    keys = mx.zeros((rows, heads, capacity, sample.keys.shape[3]), dtype=sample.keys.dtype)
    values = mx.zeros((rows, heads, capacity, sample.values.shape[3]), dtype=sample.values.dtype)
    for i, (length, c) in enumerate(zip(lengths, caches, strict=True)):
        if length:
            keys[i : i + 1, :, longest - length : longest] = c.keys[..., :length, :]
            values[i : i + 1, :, longest - length : longest] = c.values[..., :length, :]
    merged = BatchKVCache([longest - length for length in lengths])
    merged.keys, merged.values = keys, values
    merged.offset += longest
    merged._idx = longest
    return merged


def merge_caches(caches: list[list[Any]], writes: int | None = None) -> list[Any] | None:
    """Each layer's merge with room (for `writes` more positions at most), if every sequence's every layer
    is a plain KVCache (else None: mlx-lm's own merge for rotating, quantized or state-space caches)."""
    if not caches or not all(type(c) is KVCache for layers in caches for c in layers):
        return None
    return [merge_with_room([layers[i] for layers in caches], writes) for i in range(len(caches[0]))]


class MovingPromptBatch(PromptProcessingBatch):
    """A PromptProcessingBatch that hands all of its rows over to decoding without copying them.

    `kv` (group size, bits), if set: its caches are quantized after each prefill chunk and when batches
    join (models.mlx_lm_ext.quantized_batch_cache)."""

    kv: tuple[int, int] | None = None

    def prompt(self, tokens: list[list[int]]) -> None:
        super().prompt(tokens)
        if self.kv is not None:
            quantize_layers(self.prompt_cache, *self.kv)

    def extend(self, batch: PromptProcessingBatch) -> None:
        if self.kv is not None:  # both sides in one storage: a quantized cache extends a float one
            quantize_layers(self.prompt_cache, *self.kv)
            quantize_layers(batch.prompt_cache, *self.kv)
        super().extend(batch)

    def _copy(self) -> PromptProcessingBatch:
        copied = super()._copy()
        copied.kv = self.kv
        return copied

    def split(self, indices: list[int]) -> PromptProcessingBatch:
        if sorted(indices) != list(range(len(self.uids))):
            return super().split(indices)
        moved = copy.copy(self)  # the same lists and caches, now the moved batch's alone
        self.prompt_cache = []
        self.filter([])
        return moved
