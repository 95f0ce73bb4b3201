"""The forwarding BLAS's quantized product (models/platform/quantized_kernel.py, csrc/blas_forward.c): MLX's
quantized products within float32 rounding, for every scale dtype and input layout, with no float32 copy of
the weight, and a registry that never serves an address it does not hold."""

import gc

import mlx.core as mx
import pytest

from models.platform.blas_forward import QUANTIZED_ALPHA
from models.platform.quantized_kernel import quantized_kernel


@pytest.fixture(scope="module")
def kernel():
    found = quantized_kernel()
    assert found is not None  # the suite runs on the forwarding library (tests/conftest.py)
    return found


def quantized(out_dims: int, in_dims: int, bits: int, group_size: int, dtype=mx.float32, seed: int = 0):
    mx.random.seed(seed)
    packed, scales, biases = mx.quantize(mx.random.normal((out_dims, in_dims)).astype(dtype), group_size, bits)
    mx.eval(packed, scales, biases)
    return packed, scales, biases


def reference(x, packed, scales, biases, group_size, bits):
    f32 = [None if a is None else a.astype(mx.float32) for a in (scales, biases)]
    return mx.quantized_matmul(x.astype(mx.float32), packed, *f32, transpose=True, group_size=group_size, bits=bits)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(8, 32), (8, 128), (4, 32), (4, 64), (2, 64), (2, 128)])
def test_every_scale_dtype_gives_mlx_products(kernel, dtype, bits, group_size):
    packed, scales, biases = quantized(72, 384, bits, group_size, dtype)
    weight = kernel.weight(packed, scales, biases, group_size, bits)
    for rows in (1, 7, 8, 9, 19):
        x = mx.random.normal((rows, 384))
        assert mx.allclose(weight.matmul(x), reference(x, packed, scales, biases, group_size, bits),
                           rtol=1e-5, atol=1e-4).item()


def test_a_weight_without_biases_is_the_scaled_product(kernel):
    packed, scales, _ = quantized(40, 256, 4, 64)
    weight = kernel.weight(packed, scales, None, 64, 4)
    x = mx.random.normal((3, 256))
    dense = mx.dequantize(packed, scales, mx.zeros_like(scales), group_size=64, bits=4)
    assert mx.allclose(weight.matmul(x), x @ dense.T, rtol=1e-5, atol=1e-4).item()


def test_a_transposed_or_strided_input_gives_the_same_products(kernel):
    packed, scales, biases = quantized(48, 256, 8, 64)
    weight = kernel.weight(packed, scales, biases, 64, 8)
    base = mx.random.normal((256, 6))
    mx.eval(base)
    for x in (base.T, base.T[::2], mx.random.normal((4, 512))[:, ::2]):
        assert mx.allclose(weight.matmul(x), reference(x, packed, scales, biases, 64, 8),
                           rtol=1e-5, atol=1e-4).item()


def test_the_product_makes_no_float32_copy_of_the_weight(kernel):
    packed, scales, biases = quantized(2048, 2048, 4, 64)
    weight = kernel.weight(packed, scales, biases, 64, 4)
    x = mx.random.normal((8, 2048))
    mx.eval(x, weight.matmul(x))  # warm: allocations reused below come from the cache
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(weight.matmul(x))
    assert mx.get_peak_memory() - base < 2048 * 2048 * 4 // 8  # the copy would be 16 MB


def test_sharing_holders_keep_the_registration_until_the_last_is_gone(kernel):
    packed, scales, biases = quantized(32, 128, 8, 64)
    first = kernel.weight(packed, scales, biases, 64, 8)
    # the same packed bytes with scales and biases of their own (equal values, other arrays)
    second = kernel.weight(packed, mx.array(scales), mx.array(biases), 64, 8)
    x = mx.random.normal((2, 128))
    expected = reference(x, packed, scales, biases, 64, 8)
    del second
    gc.collect()
    mx.clear_cache()
    assert mx.allclose(first.matmul(x), expected, rtol=1e-5, atol=1e-4).item()


def test_a_product_naming_an_unregistered_address_is_nan_not_a_read(kernel):
    packed, _, _ = quantized(16, 128, 8, 64)
    named = mx.as_strided(packed.view(mx.float32), shape=(128, 16), strides=(1, 128))
    y = mx.addmm(mx.array(0.0), mx.ones((2, 128)), named, alpha=QUANTIZED_ALPHA, beta=0.0)
    assert mx.all(mx.isnan(y)).item()


def test_unsupported_or_strided_weights_are_refused(kernel):
    packed, scales, biases = quantized(32, 128, 8, 64)
    assert kernel.weight(packed[:, ::2], scales, biases, 64, 4) is None  # not contiguous
    packed, scales, biases = quantized(32, 128, 2, 32)
    assert kernel.weight(packed, scales, biases, 32, 2) is None  # 16 bytes hold 64 inputs: groups of 32 split
    packed, scales, biases = quantized(32, 96, 3, 32)
    assert kernel.weight(packed, scales, biases, 32, 3) is None
