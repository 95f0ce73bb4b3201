"""The CPU's batching quantized layers (models/decode/cpu_quantized.py): MLX's quantized products within
float32 rounding at every row count, one layer's float32 copy alive at a time, swapped in only where they apply."""

import gc

import mlx.core as mx
import mlx.nn as nn
import pytest

import models.decode.cpu_quantized as cpu_quantized
from models.decode.cpu_quantized import (
    KERNEL_MAX_ROWS,
    MIN_ROWS,
    CPUQuantizedEmbedding,
    CPUQuantizedLinear,
    batch_quantized_on_cpu,
    dequantized_matmul,
)
from models.weights.loader import load_variant
from tests.conftest import BUNDLED


@pytest.fixture(params=["kernel", "unpack"])
def product_path(request, monkeypatch):
    """Each product test runs with the forwarding BLAS's kernel and without it (no compiler: the unpack path)."""
    if request.param == "unpack":
        monkeypatch.setattr(cpu_quantized, "quantized_kernel", lambda: None)
    else:
        from tests.test_quantized_kernel import needs_a_compiler

        needs_a_compiler()
        assert cpu_quantized.quantized_kernel() is not None  # the suite runs on the forwarding library
    return request.param


def quantized_pair(in_dims: int, out_dims: int, bits: int, group_size: int, bias: bool = False,
                   dtype=mx.float32) -> tuple[nn.QuantizedLinear, CPUQuantizedLinear]:
    mx.random.seed(in_dims + out_dims + bits + group_size)
    linear = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        linear.bias = mx.random.normal((out_dims,))
    linear.set_dtype(dtype)
    mlx_layer = nn.QuantizedLinear.from_linear(linear, group_size, bits)
    ours = nn.QuantizedLinear.from_linear(linear, group_size, bits)
    ours.__class__ = CPUQuantizedLinear
    return mlx_layer, ours


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(1, 1, 256), (1, 3, 256), (8, 1, 256), (2, 5, 256), (1, 40, 256)])
def test_the_layer_gives_mlx_quantized_products_within_float32_rounding(bits, group_size, shape, product_path):
    mlx_layer, ours = quantized_pair(256, 96, bits, group_size, bias=True)
    x = mx.random.normal(shape)
    expected, got = mlx_layer(x), ours(x)
    assert got.shape == expected.shape == (*shape[:-1], 96) and got.dtype == mx.float32
    assert mx.allclose(got, expected, rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_layer_unpacked_on_two_streams_gives_the_same_products(bits, product_path):
    from models.decode.cpu_quantized import TWO_STREAMS_FROM

    mlx_layer, ours = quantized_pair(1024, 2050, bits, 64, bias=True)  # odd halves: 1025 output rows each
    assert 1024 * 2050 >= TWO_STREAMS_FROM
    for rows in (5, KERNEL_MAX_ROWS + 1):
        x = mx.random.normal((rows, 1024))
        assert mx.allclose(ours(x), mlx_layer(x), rtol=1e-5, atol=1e-4).item()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_bfloat16_layer_is_mlx_products_summed_in_float32_then_rounded_once(bits, product_path):
    mlx_layer, ours = quantized_pair(512, 64, bits, 64, dtype=mx.bfloat16)
    for rows in (1, 8):
        x = mx.random.normal((rows, 512)).astype(mx.bfloat16)
        exact = mx.quantized_matmul(x.astype(mx.float32), mlx_layer.weight, mlx_layer.scales.astype(mx.float32),
                                    mlx_layer.biases.astype(mx.float32), transpose=True, group_size=64, bits=bits)
        got = ours(x)
        assert got.dtype == mx.bfloat16
        # one bfloat16 rounding of the float32 sum: relative 2**-8
        assert mx.all(mx.abs(got.astype(mx.float32) - exact) <= 2**-8 * mx.abs(exact) + 1e-6).item()


def test_the_output_layer_of_tied_embeddings_batches_with_the_same_products(product_path):
    embedding = nn.Embedding(128, 64)
    mlx_layer = nn.QuantizedEmbedding.from_embedding(embedding, 32, 4)
    ours = nn.QuantizedEmbedding.from_embedding(embedding, 32, 4)
    ours.__class__ = CPUQuantizedEmbedding
    tokens = mx.array([[3, 7, 127]])
    assert mx.array_equal(ours(tokens), mlx_layer(tokens)).item()
    for rows in (1, 6):
        h = mx.random.normal((rows, 1, 64))
        assert mx.allclose(ours.as_linear(h), mlx_layer.as_linear(h), rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("width", [1024, 1472])  # one unpack stream; two (1472 x 1472 >= TWO_STREAMS_FROM)
def test_the_float32_copies_alive_at_once_do_not_grow_with_depth(width, monkeypatch):
    monkeypatch.setattr(cpu_quantized, "quantized_kernel", lambda: None)  # the path that makes copies
    layers = [quantized_pair(width, width, 4, 64)[1] for _ in range(16)]
    mx.eval([layer.parameters() for layer in layers])
    x = mx.random.normal((8, width))
    mx.eval(x)
    gc.collect()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    h = x
    for layer in layers:
        h = mx.tanh(layer(h))
    mx.eval(h)
    one_copy = width * width * 4
    assert mx.get_peak_memory() - base < 5 * one_copy  # 16 copies if every layer's were kept for the step


def test_without_the_kernel_dequantized_matmul_is_used_from_the_row_threshold_on(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_quantized, "quantized_kernel", lambda: None)
    monkeypatch.setattr(cpu_quantized, "dequantized_matmul",
                        lambda *a, **k: calls.append(a[0].shape) or dequantized_matmul(*a, **k))
    for bits in (8, 4):
        _, ours = quantized_pair(128, 32, bits, 64)
        calls.clear()
        ours(mx.zeros((1, MIN_ROWS[bits] - 1, 128)))
        assert calls == []
        ours(mx.zeros((1, MIN_ROWS[bits], 128)))
        assert calls == [(1, MIN_ROWS[bits], 128)]


def test_the_kernel_takes_up_to_its_row_limit_and_the_copy_beyond(monkeypatch):
    kernel_rows, copy_rows = [], []
    kernel_matmul = cpu_quantized.KernelWeight.matmul
    monkeypatch.setattr(cpu_quantized.KernelWeight, "matmul",
                        lambda self, x: kernel_rows.append(x.shape[1]) or kernel_matmul(self, x))
    monkeypatch.setattr(cpu_quantized, "dequantized_matmul",
                        lambda *a, **k: copy_rows.append(a[0].shape[1]) or dequantized_matmul(*a, **k))
    _, ours = quantized_pair(128, 32, 4, 64)
    for rows in (1, 8, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1):
        ours(mx.zeros((1, rows, 128)))
    assert kernel_rows == [1, 8, KERNEL_MAX_ROWS] and copy_rows == [KERNEL_MAX_ROWS + 1]


@pytest.mark.parametrize("mode,group_size,bits", [("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)])
@pytest.mark.parametrize("rows", [1, 5, KERNEL_MAX_ROWS + 3])
def test_floating_point_modes_give_mlx_products(mode, group_size, bits, rows, product_path):
    linear = nn.Linear(256, 48, bias=True)
    mlx_layer = nn.QuantizedLinear.from_linear(linear, group_size, bits, mode=mode)
    ours = nn.QuantizedLinear.from_linear(linear, group_size, bits, mode=mode)
    ours.__class__ = CPUQuantizedLinear
    x = mx.random.normal((rows, 256))
    assert mx.allclose(ours(x), mlx_layer(x), rtol=1e-5, atol=1e-4).item()


def test_only_affine_8_4_2_bit_and_floating_point_layers_are_swapped_and_their_arrays_stay():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    model.layers[0] = nn.QuantizedLinear.from_linear(model.layers[0], 32, 8)
    model.layers[1] = nn.QuantizedLinear.from_linear(model.layers[1], 32, 3)
    model.layers[2] = nn.QuantizedLinear.from_linear(model.layers[2], 32, 4, mode="mxfp4")
    before = {k: v for k, v in model.parameters()["layers"][0].items()}
    assert batch_quantized_on_cpu(model) == 2
    assert [type(m) for m in model.layers] == [CPUQuantizedLinear, nn.QuantizedLinear, CPUQuantizedLinear,
                                                nn.Linear]
    assert all(v is model.layers[0][k] for k, v in before.items())


@pytest.mark.parametrize("precision", ["q4", "q8:float32"])
def test_a_quantized_variant_loads_with_the_cpu_layers(precision):
    loaded = load_variant("tiny", BUNDLED, precision)
    kinds = {type(m) for _, m in loaded.model.named_modules()}
    assert CPUQuantizedLinear in kinds and CPUQuantizedEmbedding in kinds
    assert nn.QuantizedLinear not in kinds
