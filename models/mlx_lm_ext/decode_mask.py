"""A decode step's attention without a mask when no row of the batch is padded.

mlx-lm's BatchKVCache gives every step an array mask that hides each row's left padding. When no row is
padded (the rows started together, or those that were padded have left) that mask is all true, yet on
CUDA any array mask sends MLX's attention to its composed fallback: a matmul, the mask, a softmax and
another matmul, a few kernels per layer where its vector kernel is one (MLX 0.32: `supports_sdpa_vector`
refuses array masks). Without the mask a one-token step takes the vector kernel; on the CPU, where
attention is composed either way, it skips the mask's select and gives bitwise the same result.

The padding is read on the host once after each change (rows joining or leaving, prefill's padding
moves), not every step.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache


class UnpaddedDecodeCache(BatchKVCache):
    """BatchKVCache whose one-token mask is None while no row is padded."""

    _padded: bool | None = None  # None: unknown since the last change
    last_unmasked = False  # whether the latest one-token step's attention went without a mask

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> Any:
        if N != 1:
            return super().make_mask(N, return_array=return_array, **kwargs)
        self.last_unmasked = not return_array and kwargs.get("window_size") is None and not self._is_padded()
        return None if self.last_unmasked else super().make_mask(N, return_array=return_array, **kwargs)

    def _is_padded(self) -> bool:
        if self._padded is None:
            self._padded = bool(mx.any(self.left_padding > 0).item())
        return self._padded

    # Every BatchKVCache method that changes left_padding (in place, with +=) forgets what was read.
    def prepare(self, **kwargs: Any) -> None:
        super().prepare(**kwargs)
        self._padded = None

    def finalize(self) -> None:
        super().finalize()
        self._padded = None

    def filter(self, batch_indices: Any) -> None:
        super().filter(batch_indices)
        self._padded = None

    def extend(self, other: Any) -> None:
        super().extend(other)
        self._padded = None

    @property
    def state(self) -> tuple:
        return BatchKVCache.state.fget(self)

    @state.setter
    def state(self, v: tuple) -> None:
        BatchKVCache.state.fset(self, v)
        self._padded = None


def unmask_unpadded(caches: list[Any] | None) -> None:
    """Make a batch's plain BatchKVCache layers UnpaddedDecodeCache (in place; others are left alone)."""
    for cache in caches or ():
        if type(cache) is BatchKVCache:
            cache.__class__ = UnpaddedDecodeCache
            cache._padded = None
