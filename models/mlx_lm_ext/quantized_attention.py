"""Attention over a quantized KV cache on CUDA: the cache dequantized for the step, then MLX's fused attention.

mlx-lm attends to a quantized cache with two `quantized_matmul` products (queries x keys, then scores x
values, the second untransposed) batched over heads. MLX's CUDA backend has no kernel for some of those
shapes: a 1,977-key lone-stream step of a 1B llama at 8 bits failed with "No implementation for problem
shape: 1x1977x64x32" on an H100. On CUDA the cache's keys and values are therefore dequantized into the
queries' dtype for the step (one layer's transient float copy) and attended to with
`mx.fast.scaled_dot_product_attention`; the cache itself stays quantized, so the bytes it holds between steps
are unchanged. Metal and the CPU keep mlx-lm's products.
"""

from __future__ import annotations

import mlx.core as mx
import mlx_lm.models.base as mlx_lm_base


def dequantized_attention(queries: mx.array, q_keys: tuple[mx.array, ...], q_values: tuple[mx.array, ...],
                          scale: float, mask: mx.array | str | None, group_size: int = 64,
                          bits: int = 8) -> mx.array:
    """mlx-lm's quantized_scaled_dot_product_attention (same arguments, same result within rounding),
    computed on the dequantized keys and values."""
    keys = mx.dequantize(*q_keys, group_size=group_size, bits=bits, dtype=queries.dtype)
    values = mx.dequantize(*q_values, group_size=group_size, bits=bits, dtype=queries.dtype)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def install_on_cuda() -> bool:
    """Route mlx-lm's quantized attention through `dequantized_attention` when MLX runs on CUDA; returns
    whether it did. Idempotent."""
    if not (mx.cuda.is_available() and mx.default_device().type == mx.gpu):
        return False
    mlx_lm_base.quantized_scaled_dot_product_attention = dequantized_attention
    return True
