"""Attention over a quantized KV cache as CUDA runs it (models/mlx_lm_ext/quantized_attention.py): the same
result as mlx-lm's quantized products within rounding, for every mask mlx-lm passes, with and without grouped
heads, at key counts no kernel tile divides. The arithmetic is checked here on the CPU."""

import mlx.core as mx
import pytest
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from models.mlx_lm_ext.quantized_attention import dequantized_attention, install_on_cuda


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("queries,keys", [(1, 1977), (1, 65), (7, 71), (16, 16)])
@pytest.mark.parametrize("mask_kind", [None, "causal", "bool", "additive"])
def test_it_gives_mlx_lms_quantized_attention(bits, heads, kv_heads, queries, keys, mask_kind):
    mx.random.seed(queries + keys + bits)
    q = mx.random.normal((2, heads, queries, 64))
    k, v = mx.random.normal((2, kv_heads, keys, 64)), mx.random.normal((2, kv_heads, keys, 64))
    q_keys, q_values = mx.quantize(k, group_size=64, bits=bits), mx.quantize(v, group_size=64, bits=bits)
    mask = None
    if mask_kind == "causal":
        mask = "causal"
    elif mask_kind is not None:  # a left-padded batch row: its first keys hidden (BatchKVCache.make_mask's shape)
        visible = mx.broadcast_to(mx.arange(keys) >= 3, (2, 1, queries, keys))
        mask = visible if mask_kind == "bool" else mx.where(visible, 0.0, -1e9)
    # mlx-lm scales its queries in place (`queries *= scale`): give it its own array
    expected = quantized_scaled_dot_product_attention(mx.array(q), q_keys, q_values, scale=0.125, mask=mask,
                                                      group_size=64, bits=bits)
    got = dequantized_attention(q, q_keys, q_values, scale=0.125, mask=mask, group_size=64, bits=bits)
    assert got.shape == expected.shape
    assert mx.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_the_cpu_keeps_mlx_lms_products():
    import mlx_lm.models.base as base

    assert mx.default_device().type == mx.cpu
    assert install_on_cuda() is False
    assert base.quantized_scaled_dot_product_attention is quantized_scaled_dot_product_attention
