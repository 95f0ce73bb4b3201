"""On the CPU, quantized layers that batch: a decode step's rows through a kernel that reads the packed weight,
longer steps (prefill) through a transient float32 copy of the weight and one GEMM.

MLX's CPU `quantized_matmul` dequantizes its weight once per row: its time grows linearly with the rows (one
1536x512 layer: 1.0 ms at 1 row, 7.2 ms at 8), so a quantized variant does not batch.

Up to `KERNEL_MAX_ROWS` rows, the forwarding BLAS's kernel (models/platform/quantized_kernel.py) multiplies in
float32 straight from the packed bytes: affine 8/4/2 bits and mxfp4, nvfp4, mxfp8. Each byte is read once per 8
rows, with no copy, so a quantized step reads a fraction of float32's bytes (one 2048x2048 q8 layer at 1 row: 0.5 ms
against float32's 0.7 and MLX's 3.2; bench/results/quantized-cpu-kernel.json). From 32-48 rows the float32 copy
below overtakes it on 1024- and 2048-wide layers. Beyond those rows, or where the kernel could not be built (no C
compiler), the paths below.

From `MIN_ROWS[bits]` rows, an affine layer's weight is unpacked into float32 (a few vectorized MLX ops) and
multiplied with the BLAS in one GEMM; fewer rows keep `quantized_matmul`, computed in float32 (MLX's
bfloat16/float16 CPU kernel is ~10x slower). The float32 copy costs about as much as 1.4-1.7 rows of
`quantized_matmul` at 8 bits and 2-2.5 rows at 4 bits (bench/results/quantized-cpu-quiet.json). The floating-point
modes take MLX's dequantize (exact in bfloat16) for their copy, from the same rows (not measured for them).

MLX runs a stream's operations on one thread, so the unpack of a layer from `TWO_STREAMS_FROM` weights on
(2M: 1024 x 2816, 2816 x 1024) is split in two halves of its output rows, each on a CPU stream of its own, and
the halves' products are joined. The halves wait for the layer's input, so that they cannot unpack layers
ahead (each a float32 copy alive).

The float32 copy lives for one layer's product only; nothing keeps it. MLX allocates an operation's output
when it queues it, a few operations ahead of the ones running, so a step's extra memory is that of a few
layers' copies at most, whatever the depth (3.7 copies of a 1024x1024 layer in a chain of 6 to 24 layers).

The unpacked weight has its input dimension in plane-major order (all low nibbles, then all high ones), so the
input is permuted the same way instead of interleaving the weight (the kernel does the same per 16 bytes). The
biases enter through the input's per-group sums (sum_k x_k (s q_k + b) = s sum_k x_k q_k + b sum_k x_k). The
results are MLX's within float32 rounding (tests/test_cpu_quantized.py, tests/test_quantized_kernel.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models.decode.module_swap import swap_classes
from models.platform.quantized_kernel import KernelWeight, quantized_kernel

# up to this many rows, the forwarding BLAS's quantized product, where it runs (module docstring)
KERNEL_MAX_ROWS = 32
# bits -> from this many rows on, the float32 copy and one GEMM beat quantized_matmul (module docstring)
MIN_ROWS = {8: 2, 4: 3, 2: 3}
# weights of this many elements and more unpack in two halves on two CPU streams (module docstring)
TWO_STREAMS_FROM = 1 << 21
FAST_BITS = tuple(MIN_ROWS)
FLOAT_MODES = ("mxfp4", "nvfp4", "mxfp8")  # the kernel reads them; beyond its rows, MLX's dequantize and a GEMM


def swaps_on_cpu(mode: str, bits: int) -> bool:
    """Whether a layer of this quantization is swapped for the CPU classes below."""
    return (mode == "affine" and bits in FAST_BITS) or mode in FLOAT_MODES


def _plane_weight(packed: mx.array, scales: mx.array, group_size: int, bits: int) -> mx.array:
    """The scaled weight (biases left out) in float32, (out, in) with `in` in plane-major order."""
    out_dims = packed.shape[0]
    planes = 8 // bits
    in_dims = packed.shape[1] * 32 // bits
    u = packed.view(mx.uint8)
    if planes == 1:
        q = u.astype(mx.float32)
    else:
        shifts = mx.arange(0, 8, bits, dtype=mx.uint8)[:, None]
        q = ((u[:, None, :] >> shifts) & ((1 << bits) - 1)).astype(mx.float32)
    q = q.reshape(out_dims, planes, in_dims // group_size, group_size // planes)
    return (q * scales.astype(mx.float32)[:, None, :, None]).reshape(out_dims, in_dims)


def _plane_major(x: mx.array, bits: int) -> mx.array:
    """`x`'s last dimension in the unpacked weight's order: element p*i + j goes to j*(in/p) + i."""
    planes = 8 // bits
    if planes == 1:
        return x
    in_dims = x.shape[-1]
    return x.reshape(-1, in_dims // planes, planes).swapaxes(-1, -2).reshape(-1, in_dims)


_unpack_streams: list[mx.Stream] = []


def _halves_on_two_streams(x: mx.array, packed: mx.array, scales: mx.array, group_size: int, bits: int) -> mx.array:
    """x @ the scaled weight.T, each half of the weight's rows unpacked on a CPU stream (thread) of its own."""
    if not _unpack_streams:
        _unpack_streams.extend(mx.new_stream(mx.cpu) for _ in range(2))
    half = packed.shape[0] // 2
    # The unpack needs only the weight: tied to the layer's input it cannot run layers ahead of the products
    # (each ahead is a float32 copy alive at once); on the one stream, order alone keeps that bound.
    packed, scales = mx.depends([packed, scales], x)
    parts = []
    for stream, rows in zip(_unpack_streams, (slice(0, half), slice(half, None)), strict=True):
        with mx.stream(stream):
            weight = _plane_weight(packed[rows], scales[rows], group_size, bits)
        parts.append(x @ weight.T)
    return mx.concatenate(parts, axis=-1)


def dequantized_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array | None,
                       group_size: int, bits: int) -> mx.array:
    """`x @ dequantize(packed, scales, biases).T` through a float32 copy of the weight; the result in x's dtype."""
    lead, in_dims = x.shape[:-1], x.shape[-1]
    x32 = x.reshape(-1, in_dims).astype(mx.float32)
    planar = _plane_major(x32, bits)
    if packed.shape[0] * in_dims >= TWO_STREAMS_FROM:
        y = _halves_on_two_streams(planar, packed, scales, group_size, bits)
    else:
        y = planar @ _plane_weight(packed, scales, group_size, bits).T
    if biases is not None:
        sums = x32.reshape(-1, in_dims // group_size, group_size).sum(-1)
        y = y + sums @ biases.astype(mx.float32).T
    return y.astype(x.dtype).reshape(*lead, -1)


def float32_quantized_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array | None,
                             group_size: int, bits: int, mode: str) -> mx.array:
    """MLX's quantized_matmul, computed in float32 (the fast CPU kernel), the result in x's dtype."""
    if x.dtype == mx.float32:
        return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=group_size, bits=bits,
                                   mode=mode)
    f32 = [None if a is None else a.astype(mx.float32) for a in (x, scales, biases)]
    return mx.quantized_matmul(f32[0], packed, f32[1], f32[2], transpose=True, group_size=group_size, bits=bits,
                               mode=mode).astype(x.dtype)


_NO_KERNEL = object()  # a layer whose weight the kernel does not multiply


def _kernel_weight(layer: nn.Module) -> KernelWeight | None:
    """The layer's weight registered with the forwarding BLAS (once, again if its arrays were replaced)."""
    kernel = quantized_kernel()
    if kernel is None:
        return None
    arrays = (layer["weight"], layer["scales"], layer.get("biases"))
    held = layer.__dict__.get("_kernel_weight")
    if held is _NO_KERNEL:
        return None
    if held is None or not held.holds(*arrays):
        held = kernel.weight(*arrays, layer.group_size, layer.bits, layer.mode)
        layer._kernel_weight = _NO_KERNEL if held is None else held
    return held


def _product(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ layer's dequantized weight.T, by the path its row count makes faster."""
    rows = x.size // x.shape[-1]
    if rows <= KERNEL_MAX_ROWS and (weight := _kernel_weight(layer)) is not None:
        return weight.matmul(x)
    args = (layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits)
    if rows >= MIN_ROWS[layer.bits]:
        if layer.mode in FLOAT_MODES:
            return _float_mode_copy_matmul(x, *args, layer.mode)
        return dequantized_matmul(x, *args)
    return float32_quantized_matmul(x, *args, layer.mode)


def _float_mode_copy_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: None, group_size: int,
                            bits: int, mode: str) -> mx.array:
    """x @ the weight.T through MLX's dequantize (exact in bfloat16 for these modes) and one float32 GEMM."""
    weight = mx.dequantize(packed, scales, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)
    return (x.astype(mx.float32) @ weight.T).astype(x.dtype)


class CPUQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (same parameters, same state) that batches on the CPU (module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _product(self, x)
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose use as the output layer (tied weights) batches on the CPU."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)


_CPU_CLASSES = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}


def batch_quantized_on_cpu(model: nn.Module) -> int:
    """Swap `model`'s affine 8/4/2-bit and mxfp4/nvfp4/mxfp8 layers for the CPU classes above on the CPU;
    returns how many were swapped (0 on a GPU, where MLX's quantized kernels batch)."""
    if mx.default_device().type != mx.cpu:
        return 0
    return swap_classes(model, _CPU_CLASSES, lambda module: swaps_on_cpu(module.mode, module.bits))
