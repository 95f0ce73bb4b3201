"""On the CPU, RMSNorm and RoPE of a decode step run as fused kernels instead of dozens of small ops.

MLX has GPU kernels for `mx.fast.rms_norm` and `mx.fast.rope`, but on the CPU each expands into its
plain-op definition: ~10 and ~25 operations, each a pass over the data and a graph node that costs
a few µs to dispatch. A llama decode step is then mostly such nodes (1,159 for llama-25m, 8 layers).
Under `mx.compile` MLX fuses the elementwise runs of those same definitions into a few kernels, with
bitwise the same results (tests/test_cpu_fusion.py); the step drops to ~700 nodes, and llama-25m's
step gets 1.09x faster at 1 row, 1.03x at 8 and 1.06x at 16 here (bench/cpu_decode.py).

Only one-token (decode) calls take the compiled path, so its compile cache holds one entry per batch
size and never retraces per prompt length. Only nn.RMSNorm and nn.RoPE themselves are swapped (their
class, per instance: no state is added); models with their own norm or RoPE classes keep them.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from models.decode.module_swap import swap_classes
from models.platform.compile_cache import remove_failed_library

log = logging.getLogger(__name__)


def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def _rope(x: mx.array, offset: mx.array, dims: int, traditional: bool, base: float | None,
          scale: float) -> mx.array:
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


fused_rms_norm = mx.compile(_rms_norm)
fused_rope = mx.compile(_rope)


class FusedRMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim < 2 or x.shape[-2] != 1:
            return super().__call__(x)
        return fused_rms_norm(x, self["weight"], self.eps)


class FusedRoPE(nn.RoPE):
    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if x.ndim < 2 or x.shape[-2] != 1:
            return super().__call__(x, offset)
        # An int offset would be a constant of the trace (a retrace per position); an array is an input.
        offset = offset if isinstance(offset, mx.array) else mx.array(offset, mx.int32)
        return fused_rope(x, offset, self.dims, self.traditional, self.base, self.scale)


FUSED_CLASSES = {nn.RMSNorm: FusedRMSNorm, nn.RoPE: FusedRoPE}  # MLX class -> its fused twin
_compiles: bool | None = None


def compiles_on_cpu() -> bool:
    """Whether MLX can compile fused CPU kernels here (it builds them with the system's C++ compiler).
    A kernel library that fails to load (cut off by another process) is removed and built once more."""
    global _compiles
    if _compiles is None:
        for attempt in (1, 2):
            try:
                x = mx.ones((2, 1, 8))
                mx.eval(fused_rms_norm(x, mx.ones((8,)), 1e-5),
                        fused_rope(x[:, None], mx.array(3), 8, False, 1e4, 1.0))
                _compiles = True
                break
            except Exception as e:  # MLX raises RuntimeError when the JIT's compiler is missing or fails
                if attempt == 1 and remove_failed_library(e):
                    continue
                log.warning("fused CPU kernels unavailable (%s: %s): decoding with MLX's plain ops",
                            type(e).__name__, str(e)[:200])
                _compiles = False
    return _compiles


def fused_kernels_state() -> str:
    """For /memory: "fused" (the CPU decodes with fused kernels), "unavailable" (it cannot compile
    them here), "not probed" (no model loaded on the CPU yet) or "not used" (a GPU)."""
    if mx.default_device().type != mx.cpu:
        return "not used"
    return {None: "not probed", True: "fused", False: "unavailable"}[_compiles]


def fuse_for_cpu(model: Any) -> int:
    """Swap `model`'s RMSNorm and RoPE modules for the fused ones when MLX runs on the CPU; returns how
    many were swapped (0 on a GPU, where MLX has kernels of its own)."""
    if mx.default_device().type != mx.cpu or not compiles_on_cpu():
        return 0
    return swap_classes(model, FUSED_CLASSES)
