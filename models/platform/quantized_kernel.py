"""The forwarding BLAS's quantized product: a decode step's rows times a quantized weight, read from its packed bytes.

The forwarding library (blas_forward.py, csrc/blas_forward.c) keeps a registry of quantized weights by the address
of their packed bytes. Its `cblas_sgemm`, given `QUANTIZED_ALPHA` as alpha, multiplies A by the registered weight
whose address is B, in float32, without dequantizing it: each packed byte is read once per pass of up to 8 rows.
MLX reaches it through `mx.addmm` with that alpha and, as B, a strided view that starts at the packed bytes and
has the product's (in, out) shape. MLX never reads that view (its CPU matmul passes the pointer to the BLAS), and
the view is built only once a probe product has shown that MLX's `cblas_sgemm` is the forwarding library's.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

import mlx.core as mx
import numpy as np

from models.platform.blas import blas_info
from models.platform.blas_forward import QUANTIZED_ALPHA

log = logging.getLogger(__name__)

_MODES = {"affine": 0, "mxfp4": 1, "nvfp4": 2, "mxfp8": 3}  # csrc/blas_forward.c's MODE_*
_SCALE_TYPES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}  # affine scales and biases; SCALE_* there
_FP_SCALE_TYPES = {"mxfp4": 3, "mxfp8": 3, "nvfp4": 4}  # uint8 scales: E8M0, or nvfp4's FP8 E4M3
_ZERO = mx.array(0.0)


def _address(a: mx.array) -> int | None:
    """The address of an array's data (evaluating it), None unless it is row-contiguous; 16-bit floats through
    a same-width integer view."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    data = np.asarray(a)
    return data.ctypes.data if data.flags.c_contiguous else None


class KernelWeight:
    """One quantized weight registered with the library. It holds the arrays it registered (their addresses
    stay valid while it lives) and unregisters them when the last holder of that packed address drops it."""

    def __init__(self, kernel: QuantizedKernel, packed: mx.array, scales: mx.array, biases: mx.array | None,
                 registration: tuple, out_dims: int, in_dims: int):
        self.arrays = (packed, scales, biases)
        self._kernel, self._registration = kernel, registration
        self.out_dims, self.in_dims = out_dims, in_dims
        # B of the product: a view of the packed bytes with the product's (in, out) shape; only its address and
        # shape reach the BLAS (module docstring). Made once: a step then adds one operation per layer.
        self._named = mx.as_strided(packed.view(mx.float32), shape=(in_dims, out_dims), strides=(1, in_dims))
        mx.eval(self._named)

    def holds(self, packed: mx.array, scales: mx.array, biases: mx.array | None) -> bool:
        """Whether these are the arrays registered (a layer whose arrays were replaced registers anew)."""
        return all(a is b for a, b in zip(self.arrays, (packed, scales, biases), strict=True))

    def matmul(self, x: mx.array) -> mx.array:
        """x @ dequantize(weight).T, computed in float32 by the library; the result in x's dtype."""
        if x.dtype == mx.float32:  # addmm folds leading dimensions itself
            return mx.addmm(_ZERO, x, self._named, alpha=QUANTIZED_ALPHA, beta=0.0)
        y = mx.addmm(_ZERO, x.astype(mx.float32), self._named, alpha=QUANTIZED_ALPHA, beta=0.0)
        return y.astype(x.dtype)

    def __del__(self) -> None:
        # runs before the arrays are released, so the address is still this weight's
        self._kernel.release(self._registration)


class QuantizedKernel:
    """The library's registry and product (module docstring)."""

    def __init__(self, lib: ctypes.CDLL):
        self._register = lib.dtype_serve_quantized_register
        self._register.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6
        self._register.restype = ctypes.c_int
        self._forget = lib.dtype_serve_quantized_forget
        self._forget.argtypes = [ctypes.c_void_p]
        self._supported = lib.dtype_serve_quantized_supported
        self._supported.argtypes = [ctypes.c_int] * 4
        alpha = lib.dtype_serve_quantized_alpha
        alpha.restype = ctypes.c_float
        if alpha() != QUANTIZED_ALPHA:
            raise OSError("the forwarding library was built with another QUANTIZED_ALPHA")
        # packed address -> the registrations of the live KernelWeights under it (the library keeps the last)
        self._holders: dict[int, list[tuple]] = {}
        self._lock = threading.RLock()  # release() runs from __del__, which a collection inside weight() may call

    def supports(self, mode: str, bits: int, group_size: int, in_dims: int) -> bool:
        """Whether the library multiplies weights of this quantization mode, bits, group size and input width."""
        return mode in _MODES and bool(self._supported(_MODES[mode], bits, group_size, in_dims))

    def weight(self, packed: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
               mode: str = "affine") -> KernelWeight | None:
        """Register a quantized weight as MLX lays it out (packed (out, in * bits / 32) uint32; scales, and for
        affine biases, (out, in / group_size)); None where the library does not multiply it."""
        out_dims, in_dims = packed.shape[0], packed.shape[1] * 32 // bits
        if mode == "affine":
            scale_type = _SCALE_TYPES.get(scales.dtype)
            same_biases = biases is None or biases.dtype == scales.dtype
        else:
            scale_type = _FP_SCALE_TYPES.get(mode) if scales.dtype == mx.uint8 else None
            same_biases = biases is None
        if packed.dtype != mx.uint32 or scale_type is None or not same_biases \
                or not self.supports(mode, bits, group_size, in_dims):
            return None
        addresses = [None if a is None else _address(a) for a in (packed, scales, biases)]
        if None in addresses[:2] or (biases is not None and addresses[2] is None):
            return None  # not row-contiguous
        registration = (*addresses, _MODES[mode], scale_type, bits, group_size, out_dims, in_dims)
        with self._lock:
            if self._register(*registration) != 0:
                return None
            self._holders.setdefault(addresses[0], []).append(registration)
        return KernelWeight(self, packed, scales, biases, registration, out_dims, in_dims)

    def release(self, registration: tuple) -> None:
        """A KernelWeight is gone: the library keeps a live holder's registration of its address, or forgets it."""
        with self._lock:
            live = self._holders.get(registration[0], [])
            if registration in live:
                live.remove(registration)
            if live:
                self._register(*live[-1])  # its scales and biases may be other arrays than the one gone
            else:
                self._holders.pop(registration[0], None)
                self._forget(registration[0])


def _probe(kernel: QuantizedKernel) -> bool:
    """One product through the library: True if MLX's cblas_sgemm is the forwarding library's.

    The packed buffer is as large as the view that names it, so a plain BLAS reads in bounds (and gets another
    answer: the bytes 0x01 read as floats are ~1e-38)."""
    out_dims, in_dims = 4, 64
    base = mx.full((out_dims * in_dims,), 0x01010101, dtype=mx.uint32)
    packed = base[: out_dims * in_dims // 4].reshape(out_dims, in_dims // 4)
    scales = mx.ones((out_dims, 1), dtype=mx.float32)
    biases = mx.full((out_dims, 1), 0.5, dtype=mx.float32)
    mx.eval(base, packed, scales, biases)
    weight = kernel.weight(packed, scales, biases, 64, 8)
    if weight is None or _address(base) != _address(packed):
        return False
    y = weight.matmul(mx.ones((1, in_dims), dtype=mx.float32))
    return bool(mx.all(y == in_dims * 1.5).item())


@functools.cache
def quantized_kernel() -> QuantizedKernel | None:
    """The library's quantized product, where MLX runs on the CPU with the forwarding library as its BLAS."""
    if mx.default_device().type != mx.cpu:
        return None
    try:
        kernel = QuantizedKernel(ctypes.CDLL(blas_info().library))
    except (OSError, AttributeError):
        return None
    if not _probe(kernel):
        log.warning("MLX's BLAS is not the forwarding library; quantized layers take the unpack path")
        return None
    return kernel
