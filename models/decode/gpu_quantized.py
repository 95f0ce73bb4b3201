"""On a GPU, a quantized layer multiplies a prefill-sized input through a transient copy of its weight.

MLX's GPU `quantized_matmul` keeps pace with the float product at decode sizes (a few to a few dozen rows),
where reading fewer weight bytes is what counts, but falls behind at prefill sizes, where the product is
compute-bound: on an H200, 2,048 rows of a 4096-wide layer took 3.5-4.4x the bfloat16 product. Dequantizing
the layer into the input's dtype and one float GEMM cost about the float product plus one pass over the weight.
So from `MIN_ROWS` rows on a layer multiplies through that copy; fewer rows keep `quantized_matmul`. On an H100
(`bench/quantized_gpu.py`, bench/results/quantized-gpu-h100.json, 4096x4096, bfloat16): at 256 rows the copy took
1.15x quantized_matmul's time at q8 and 0.82x at q4, from 512 rows 0.67-0.84x, at 2,048 rows 0.24-0.31x. Every
quantization mode MLX dequantizes (affine, mxfp8, mxfp4, nvfp4) takes this path. The copy lives for one product only.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models.decode.module_swap import swap_classes

MIN_ROWS = 256  # from this many rows on, the float copy and one GEMM beat quantized_matmul (module docstring)


def _dequantized(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
                         mode=layer.mode, dtype=dtype)


def _product(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ layer's dequantized weight.T, by the path its row count makes faster."""
    if x.size // x.shape[-1] >= MIN_ROWS:
        return x @ _dequantized(layer, x.dtype).T
    return mx.quantized_matmul(x, layer["weight"], layer["scales"], layer.get("biases"), transpose=True,
                               group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


class GPUQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (same parameters, same state) whose prefill-sized products run as float GEMMs."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _product(self, x)
        return y + self["bias"] if "bias" in self else y


class GPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose use as the output layer (tied weights) does the same."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)


_GPU_CLASSES = {nn.QuantizedLinear: GPUQuantizedLinear, nn.QuantizedEmbedding: GPUQuantizedEmbedding}


def prefill_quantized_on_gpu(model: nn.Module) -> int:
    """Swap `model`'s quantized layers for the GPU classes above when MLX runs on a GPU; returns how many
    were swapped (0 on the CPU, where models.decode.cpu_quantized decides)."""
    if mx.default_device().type != mx.gpu:
        return 0
    return swap_classes(model, _GPU_CLASSES)
