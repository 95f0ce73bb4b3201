"""The GPU's prefill path for quantized layers (models/decode/gpu_quantized.py): from MIN_ROWS rows the layer
multiplies through a dequantized copy, giving MLX's quantized product within rounding for every mode; below it,
MLX's own product exactly. The arithmetic is the device's, so it is checked here on the CPU; the swap is GPU-only."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from models.decode.gpu_quantized import MIN_ROWS, GPUQuantizedEmbedding, GPUQuantizedLinear, prefill_quantized_on_gpu

MODES = [("affine", 8, 64), ("affine", 4, 32), ("mxfp8", 8, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)]


def layer_pair(mode: str, bits: int, group_size: int) -> tuple[nn.QuantizedLinear, GPUQuantizedLinear]:
    mx.random.seed(bits + group_size)
    linear = nn.Linear(128, 48, bias=True)
    linear.bias = mx.random.normal((48,))
    mlx_layer = nn.QuantizedLinear.from_linear(linear, group_size, bits, mode=mode)
    ours = nn.QuantizedLinear.from_linear(linear, group_size, bits, mode=mode)
    ours.__class__ = GPUQuantizedLinear
    return mlx_layer, ours


@pytest.mark.parametrize("mode,bits,group_size", MODES)
@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, MIN_ROWS + 3])
def test_the_layer_gives_mlx_quantized_products(mode, bits, group_size, rows):
    mlx_layer, ours = layer_pair(mode, bits, group_size)
    x = mx.random.normal((1, rows, 128))
    expected, got = mlx_layer(x), ours(x)
    if rows < MIN_ROWS:
        assert mx.array_equal(expected, got)  # the same kernel
    else:
        assert mx.allclose(expected, got, rtol=1e-4, atol=1e-4)


def test_a_tied_output_layer_takes_the_same_path():
    mx.random.seed(3)
    embedding = nn.Embedding(64, 128)
    mlx_layer = nn.QuantizedEmbedding.from_embedding(embedding, 64, 4)
    ours = nn.QuantizedEmbedding.from_embedding(embedding, 64, 4)
    ours.__class__ = GPUQuantizedEmbedding
    x = mx.random.normal((MIN_ROWS, 128))
    assert mx.allclose(mlx_layer.as_linear(x), ours.as_linear(x), rtol=1e-4, atol=1e-4)
    assert mx.array_equal(mlx_layer(mx.array([[1, 5]])), ours(mx.array([[1, 5]])))  # the lookup is MLX's own


def test_nothing_is_swapped_on_the_cpu():
    model = nn.Sequential(nn.QuantizedLinear(64, 64, group_size=64, bits=4))
    assert mx.default_device().type == mx.cpu  # the test suite's device
    assert prefill_quantized_on_gpu(model) == 0 and type(model.layers[0]) is nn.QuantizedLinear
