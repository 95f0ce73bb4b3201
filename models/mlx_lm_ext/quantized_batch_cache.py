"""A batch KV cache stored quantized: mlx-lm's BatchKVCache with QuantizedKVCache's storage.

mlx-lm quantizes the KV cache of a lone stream (QuantizedKVCache, `kv_bits`) but its BatchKVCache has no
quantized form, so batched decoding always held float keys and values. QuantizedBatchKVCache keeps every
layout rule of BatchKVCache (rows left-padded to a shared write index `_idx`, buffers grown `step` tokens
at a time, prefill's right padding rolled to the left by `finalize`) on three arrays per side: packed
uint32 codes, scales and biases (`mx.quantize`'s affine form). Having `bits` and `group_size` sends
mlx-lm's attention (`mlx_lm.models.base.scaled_dot_product_attention`) to its quantized path, exactly
as for QuantizedKVCache.

When it quantizes follows mlx_lm.generate with `quantized_kv_start=0`: a prompt's prefill chunk attends
to float keys and values, which are quantized when the chunk is done (`quantize_layers`); every later
token attends to the quantized cache. A sequence's cache leaves the batch as a QuantizedKVCache
(`extract`) and joins it from one (`merge`): the prefix cache and the lone stream's hand-off.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, dynamic_roll

from models.mlx_lm_ext.quantized_attention import install_on_cuda

Quantized = tuple[mx.array, mx.array, mx.array]  # (packed codes, scales, biases), tokens on axis 2


def _zeros_like_quantized(shape: tuple[int, int, int], parts: Quantized) -> Quantized:
    """Zeroed buffers of `shape` (rows, heads, tokens) with the last dims and dtypes of `parts`."""
    return tuple(mx.zeros((*shape, p.shape[-1]), dtype=p.dtype) for p in parts)


def _empty_quantized(shape: tuple[int, int, int], dim: int, dtype: mx.Dtype, group_size: int,
                     bits: int) -> Quantized:
    per_word = 32 // bits
    return (mx.zeros((*shape, dim // per_word), dtype=mx.uint32), mx.zeros((*shape, dim // group_size), dtype=dtype),
            mx.zeros((*shape, dim // group_size), dtype=dtype))


def _tokens(parts: Quantized, start: int | None, stop: int | None) -> Quantized:
    return tuple(p[..., start:stop, :] for p in parts)


class QuantizedBatchKVCache(BatchKVCache):
    """BatchKVCache whose keys and values are stored by `mx.quantize` (`bits`, `group_size`)."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8) -> None:
        super().__init__(left_padding)
        self.group_size = group_size
        self.bits = bits

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Quantized, Quantized]:
        prev, count = self._idx, keys.shape[2]
        if self.keys is None or prev + count > self.keys[0].shape[2]:
            rows, heads = keys.shape[:2]
            shape = (rows, heads, (self.step + count - 1) // self.step * self.step)
            new_k = _empty_quantized(shape, keys.shape[3], keys.dtype, self.group_size, self.bits)
            new_v = _empty_quantized(shape, values.shape[3], values.dtype, self.group_size, self.bits)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                old_k, old_v = _tokens(self.keys, None, prev), _tokens(self.values, None, prev)
                self.keys = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(old_k, new_k, strict=True))
                self.values = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(old_v, new_v, strict=True))
        self.offset = self.offset + count
        self._idx += count
        for stored, new in ((self.keys, keys), (self.values, values)):
            for part, q in zip(stored, mx.quantize(new, group_size=self.group_size, bits=self.bits), strict=True):
                part[..., prev : self._idx, :] = q
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        return _tokens(self.keys, None, self._idx), _tokens(self.values, None, self._idx)

    def finalize(self) -> None:
        if self._right_padding is not None:
            padding = self._right_padding[:, None]
            self.keys = tuple(dynamic_roll(p, padding, axis=2) for p in self.keys)
            self.values = tuple(dynamic_roll(p, padding, axis=2) for p in self.values)
            self.offset = self.offset - self._right_padding
            self.left_padding += self._right_padding
            self._right_padding = None

    def filter(self, batch_indices: Any) -> None:
        if self.keys is not None:
            self.keys = tuple(p[batch_indices] for p in self.keys)
            self.values = tuple(p[batch_indices] for p in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())  # padding every row has: dropped, as BatchKVCache does
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = _tokens(self.keys, shift, None), _tokens(self.values, shift, None)
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchKVCache) -> None:
        """Append `other`'s rows (a float BatchKVCache is quantized first), both right-aligned at the
        longer write index."""
        if not isinstance(other, QuantizedBatchKVCache):
            other = quantized_batch(other, self.group_size, self.bits)
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        sample = self if self.keys is not None else other
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def aligned(c: QuantizedBatchKVCache) -> tuple[Quantized, Quantized, mx.array]:
            keys, values = c.keys, c.values
            if keys is None:
                shape = (c.offset.shape[0], sample.keys[0].shape[1], 0)
                keys, values = _zeros_like_quantized(shape, sample.keys), _zeros_like_quantized(shape, sample.values)
            left = idx - c._idx
            right = size - keys[0].shape[2] - left
            if right < 0:
                keys, values, right = _tokens(keys, None, right), _tokens(values, None, right), 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                keys, values = tuple(mx.pad(p, widths) for p in keys), tuple(mx.pad(p, widths) for p in values)
            return keys, values, c.left_padding + left

        (k1, v1, p1), (k2, v2, p2) = aligned(self), aligned(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2, strict=True))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2, strict=True))
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx: int) -> QuantizedKVCache:
        """Row `idx` as a lone QuantizedKVCache holding exactly its tokens."""
        cache = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        padding = self.left_padding.tolist()[idx]
        cache.keys = tuple(mx.contiguous(p[idx : idx + 1, :, padding : self._idx]) for p in self.keys)
        cache.values = tuple(mx.contiguous(p[idx : idx + 1, :, padding : self._idx]) for p in self.values)
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list[Any], group_size: int = 64, bits: int = 8) -> QuantizedBatchKVCache:
        """Lone caches (QuantizedKVCache, or empty ones) left-padded into one, with room for `step` more tokens."""
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths, default=0)
        merged = cls([longest - n for n in lengths], group_size=group_size, bits=bits)
        if longest == 0:
            return merged
        sample = next(c for c in caches if c.keys is not None)
        shape = (len(caches), sample.keys[0].shape[1], (longest // cls.step + 1) * cls.step)
        keys, values = _zeros_like_quantized(shape, sample.keys), _zeros_like_quantized(shape, sample.values)
        for i, (length, c) in enumerate(zip(lengths, caches, strict=True)):
            if length:
                for stored, own in ((keys, c.keys), (values, c.values)):
                    for part, piece in zip(stored, own, strict=True):
                        part[i : i + 1, :, longest - length : longest] = piece[..., :length, :]
        merged.keys, merged.values = keys, values
        merged.offset += longest
        merged._idx = longest
        return merged

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(p.nbytes for p in (*self.keys, *self.values))


def quantized_batch(cache: BatchKVCache, group_size: int, bits: int) -> QuantizedBatchKVCache:
    """A float BatchKVCache's tokens, quantized (padding, offsets and write index kept)."""
    out = QuantizedBatchKVCache([], group_size=group_size, bits=bits)
    out.left_padding, out.offset, out._idx = cache.left_padding, cache.offset, cache._idx
    out._right_padding = cache._right_padding
    if cache.keys is not None and cache._idx > 0:
        out.keys = tuple(mx.quantize(cache.keys[..., : cache._idx, :], group_size=group_size, bits=bits))
        out.values = tuple(mx.quantize(cache.values[..., : cache._idx, :], group_size=group_size, bits=bits))
    return out


def quantize_layers(caches: list[Any], group_size: int, bits: int) -> None:
    """Quantize, in place, the float layers of a cache list: a lone stream's KVCache becomes a
    QuantizedKVCache (mlx-lm's to_quantized), a batch's BatchKVCache a QuantizedBatchKVCache; quantized,
    rotating and state-space layers are left as they are."""
    install_on_cuda()  # every quantized cache passes here: attention over it must run where it is made
    for i, cache in enumerate(caches):
        if type(cache) is KVCache:
            caches[i] = cache.to_quantized(group_size=group_size, bits=bits)
        elif isinstance(cache, BatchKVCache) and not isinstance(cache, QuantizedBatchKVCache):
            caches[i] = quantized_batch(cache, group_size, bits)


def merge_quantized(caches: list[list[Any]], group_size: int, bits: int) -> list[Any] | None:
    """Each layer of the joining sequences' caches merged into a QuantizedBatchKVCache, if some hold quantized
    tokens and every layer is a QuantizedKVCache or an empty KVCache (else None: mlx-lm's own merge)."""
    layers = [c for sequence in caches for c in sequence]
    if not layers or not any(type(c) is QuantizedKVCache and c.keys is not None for c in layers):
        return None
    if not all(type(c) is QuantizedKVCache or (type(c) is KVCache and c.keys is None) for c in layers):
        return None
    return [QuantizedBatchKVCache.merge([sequence[i] for sequence in caches], group_size, bits)
            for i in range(len(caches[0]))]
