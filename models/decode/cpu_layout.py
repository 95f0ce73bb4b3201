"""On the CPU, float32 Linear weights are stored column-major (the transpose of the checkpoint's layout) unless
the forwarding BLAS multiplies them.

Under the forwarding BLAS (models/platform/blas_forward.py, csrc/blas_forward.c) they keep the checkpoint's
row-major layout: its few-row product streams each weight row once per 8 rows of a decode step, which beats
OpenBLAS's sgemm on column-major weights from 2 rows (llama-25m's step 1.6-1.85x faster at 8 rows, 0.94-0.98x
at 1: BENCHMARKS.md, "Few-row float32 products"). Without it (no C compiler, another BLAS):

A Linear computes `x @ weight.T`. With the checkpoint's row-major weight, OpenBLAS spends most of a
decode step's matrix products packing the weight (perf: `sgemm_incopy` took more time than the
multiply kernel itself); stored the other way round, `weight.T` is row-major and the same products
run 1.2-1.5x faster at 1-8 rows (bench/cpu_decode.py), with the same tokens and logits within float32
rounding: some CPUs' BLAS kernels sum the two layouts' products in another order (tests/test_cpu_layout.py).
Prefill-sized products are unchanged.

A model whose output layer is its embedding (tied: no `lm_head`, as in most small models) gets the
same for its embedding: a 151,936 x 896 head took 41 instead of 66 ms at 8 rows, and the token lookup,
now strided, ~0.06 ms more per step (20 ms more per 1,000 prompt tokens).

bfloat16 and float16 run on MLX's own CPU kernels, which gain nothing from it, so their weights stay
row-major; so do all weights on a GPU.

The layout is applied while casting (models.weights.loader.cast_parameters): the copy is made in the
source's dtype before the cast, so a load's peak stays the final size plus about one tensor.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models.platform.quantized_kernel import quantized_kernel


def linear_weight_paths(model: nn.Module) -> frozenset[str]:
    """The parameter paths of `model`'s plain Linear weights, and of its embeddings when they are also its
    output layer, when MLX runs on the CPU without the forwarding BLAS (else none)."""
    # the forwarding library is MLX's BLAS exactly where its quantized product passed its probe
    if mx.default_device().type != mx.cpu or quantized_kernel() is not None:
        return frozenset()
    modules = model.named_modules()
    tied = not any(name.rsplit(".", 1)[-1] == "lm_head" for name, _ in modules)
    kinds = (nn.Linear, nn.Embedding) if tied else (nn.Linear,)
    return frozenset(f"{name}.weight" if name else "weight" for name, module in modules if type(module) in kinds)


def laid_out(value: mx.array, target: mx.Dtype | None) -> mx.array:
    """A Linear weight cast to `target` (None: kept as is) in the layout its dtype multiplies fastest in
    on the CPU: float32 column-major (transposed first, in the source dtype), others row-major.
    Either is free when `value` already has it."""
    final = value.dtype if target is None else target
    if final == mx.float32:
        transposed = mx.contiguous(value.T)
        return (transposed if target is None else transposed.astype(target)).T
    return mx.contiguous(value if target is None else value.astype(target))
