"""The forwarding BLAS's quantized product (models/platform/quantized_kernel.py, csrc/blas_forward.c): MLX's
quantized products within float32 rounding, for every scale dtype and input layout, with no float32 copy of
the weight, and a registry that never serves an address it does not hold."""

import gc
import platform
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from models.platform.blas_forward import QUANTIZED_ALPHA
from models.platform.quantized_kernel import quantized_kernel


def needs_a_compiler() -> None:
    from models.platform.blas_forward import _compiler

    if sys.platform.startswith("linux") and _compiler() is None:
        pytest.skip("no C compiler on this machine: the kernel cannot be built (scripts/install.sh installs gcc)")


@pytest.fixture(scope="module")
def kernel():
    needs_a_compiler()
    found = quantized_kernel()
    assert found is not None  # the suite runs on the forwarding library (tests/conftest.py)
    return found


def quantized(out_dims: int, in_dims: int, bits: int, group_size: int, dtype=mx.float32, seed: int = 0):
    mx.random.seed(seed)
    packed, scales, biases = mx.quantize(mx.random.normal((out_dims, in_dims)).astype(dtype), group_size, bits)
    mx.eval(packed, scales, biases)
    return packed, scales, biases


def reference(x, packed, scales, biases, group_size, bits, mode="affine"):
    f32 = [None if a is None or a.dtype == mx.uint8 else a.astype(mx.float32) for a in (scales, biases)]
    if mode != "affine":
        f32[0] = scales
    return mx.quantized_matmul(x.astype(mx.float32), packed, *f32, transpose=True, group_size=group_size, bits=bits,
                               mode=mode)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(8, 32), (8, 128), (4, 32), (4, 64), (2, 64), (2, 128)])
def test_every_scale_dtype_gives_mlx_products(kernel, dtype, bits, group_size):
    packed, scales, biases = quantized(72, 384, bits, group_size, dtype)
    weight = kernel.weight(packed, scales, biases, group_size, bits)
    for rows in (1, 7, 8, 9, 19):
        x = mx.random.normal((rows, 384))
        assert mx.allclose(weight.matmul(x), reference(x, packed, scales, biases, group_size, bits),
                           rtol=1e-5, atol=1e-4).item()


@pytest.mark.parametrize("mode,bits,group_size", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_the_floating_point_modes_give_mlx_products(kernel, mode, bits, group_size):
    mx.random.seed(3)
    w = mx.random.normal((56, 512)) * mx.exp(mx.random.normal((56, 1)) * 3)  # scales over many exponents
    w = mx.where(mx.random.uniform(shape=w.shape) < 0.02, 0.0, w)  # and exact zeros
    packed, scales = mx.quantize(w, mode=mode)
    weight = kernel.weight(packed, scales, None, group_size, bits, mode)
    assert weight is not None
    for rows in (1, 6, 17):
        x = mx.random.normal((rows, 512))
        expected = reference(x, packed, scales, None, group_size, bits, mode)
        assert mx.allclose(weight.matmul(x), expected, rtol=1e-5, atol=1e-4 * mx.abs(expected).max()).item()


def test_every_fp8_code_decodes_as_mlx_does(kernel):
    # mxfp8 elements are FP8 E4M3: all 256 codes (NaNs included) against MLX's dequantize, one code per row
    codes = mx.arange(256, dtype=mx.uint32)[:, None]  # little-endian: the code is the word's first element
    packed = mx.concatenate([codes, mx.zeros((256, 7), dtype=mx.uint32)], axis=1)  # 32 inputs: one group
    scales = mx.full((256, 1), 127, dtype=mx.uint8)  # 2^0
    mx.eval(packed, scales)
    weight = kernel.weight(packed, scales, None, 32, 8, "mxfp8")
    x = mx.zeros((1, 32)).at[0, 0].add(1.0)
    got = weight.matmul(x)[0]
    expected = mx.dequantize(packed, scales, group_size=32, bits=8, mode="mxfp8")[:, 0].astype(mx.float32)
    assert mx.array_equal(mx.isnan(got), mx.isnan(expected)).item()
    finite = ~mx.isnan(expected)
    assert mx.array_equal(mx.where(finite, got, 0), mx.where(finite, expected, 0)).item()


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
    packed, scales = mx.quantize(mx.random.normal((8, 64)), mode="mxfp4")
    assert kernel.weight(packed, scales.astype(mx.float32), None, 32, 4, "mxfp4") is None  # scales are E8M0 bytes


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


# the kernel's vector paths besides this machine's own (every other test): AVX2 (no AVX-512) on x86; the generic
# vectors are the build of a compiler that refuses -march=native (the last test)
_TARGETS = ["-march=haswell"] if platform.machine() == "x86_64" and {"avx2", "fma"} <= _cpu_flags() else []

_CHILD = """
import sys
from models.platform.blas import configure_blas
configure_blas(sys.argv[1])
import mlx.core as mx
from models.platform.quantized_kernel import quantized_kernel
kernel = quantized_kernel()
assert kernel is not None
for bits, group_size in ((8, 64), (4, 32), (2, 64)):
    packed, scales, biases = mx.quantize(mx.random.normal((40, 256)), group_size, bits)
    scales, biases = scales.astype(mx.bfloat16), biases.astype(mx.bfloat16)
    weight = kernel.weight(packed, scales, biases, group_size, bits)
    for rows in (1, 5, 9):
        x = mx.random.normal((rows, 256))
        expected = mx.quantized_matmul(x, packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                       transpose=True, group_size=group_size, bits=bits)
        assert mx.allclose(weight.matmul(x), expected, rtol=1e-5, atol=1e-4).item(), (bits, rows)
import numpy as np  # the few-row float32 product, against float64 sums: rows past the vector paths' row blocks
w = np.random.default_rng(0).standard_normal((1003, 300), dtype=np.float32)
for rows in (1, 3, 5, 9, 16):
    x = np.random.default_rng(rows).standard_normal((rows, 300), dtype=np.float32)
    got = np.array(mx.array(x) @ mx.array(w).T)
    assert np.allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3), ("float", rows)
v = np.random.default_rng(1).standard_normal((2000, 64), dtype=np.float32)  # attention's values: positions x width
for rows in (1, 3, 8):
    s = np.random.default_rng(rows).standard_normal((rows, 2000), dtype=np.float32)
    got = np.array(mx.array(s) @ mx.array(v))
    assert np.allclose(got, s.astype(np.float64) @ v.astype(np.float64), rtol=1e-4, atol=1e-3), ("values", rows)
print("products agree")
"""


def _products_agree(library: str) -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD, library], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0 and "products agree" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("target", _TARGETS)
def test_the_products_agree_on_every_vector_path(tmp_path, target, kernel):
    from models.platform import blas_forward
    from models.platform.openblas_wheel import wheel_library

    flags = tuple(target if f == "-march=native" else f for f in blas_forward.COMPILE_FLAGS)
    library = blas_forward._build(wheel_library(), tmp_path / "libopenblas-forward-test.so", "test",
                                  blas_forward._compiler(), (flags,))
    _products_agree(str(library))


def test_after_a_failed_compiler_one_that_refuses_march_native_builds_generic_vectors_that_agree(
        tmp_path, monkeypatch, kernel):
    from models.platform import blas_forward

    real = blas_forward._compiler()
    refusing = tmp_path / "cc-without-native"  # a compiler that does not know this CPU
    refusing.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec {real} "$@"\n')
    refusing.chmod(0o755)
    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that fails: remembered for it ...
    assert blas_forward.forwarding_library() is None and blas_forward.forwarding_library() is None
    monkeypatch.setenv("CC", str(refusing))  # ... not for another one
    library = blas_forward.forwarding_library()
    assert library is not None
    _products_agree(library)
