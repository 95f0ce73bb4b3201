"""Exact memory of loaded variants (summed from their arrays) and of the process/device."""

from __future__ import annotations

import os
from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from models.weights.dtypes import dtype_name
from models.weights.sizes import parse_size


def bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for _, array in tree_flatten(model.parameters()):
        totals[dtype_name(array.dtype)] += array.nbytes
    return dict(sorted(totals.items()))


def array_sizes(model: nn.Module) -> dict[int, int]:
    """The bytes of each of `model`'s arrays, by identity (an array two models share is one key)."""
    return {id(array): array.nbytes for _, array in tree_flatten(model.parameters())}


def unique_bytes(sizes) -> int:
    """Bytes of the distinct arrays of several models, given as their `array_sizes` (shared arrays
    count once)."""
    seen: dict[int, int] = {}
    for one in sizes:
        seen.update(one)
    return sum(seen.values())


def floating_dtypes(model: nn.Module) -> set[str]:
    return {dtype_name(a.dtype) for _, a in tree_flatten(model.parameters())
            if mx.issubdtype(a.dtype, mx.floating)}


def parameter_count(model: nn.Module) -> int:
    """Weights as mlx-lm counts them: a quantized layer's packed weight by its logical size."""
    from mlx_lm.utils import get_total_parameters

    return get_total_parameters(model)


def bytes_by_role(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized layers' packed weights, their scales and biases, and of the rest."""
    roles = {"packed_weights": 0, "scales": 0, "biases": 0, "rest": 0}
    modules = dict(model.named_modules())
    for path, array in tree_flatten(model.parameters()):
        parent, _, leaf = path.rpartition(".")
        module = modules.get(parent)
        quantized = module is not None and hasattr(module, "bits") and "scales" in module
        role = {"weight": "packed_weights", "scales": "scales", "biases": "biases"}.get(leaf) if quantized else None
        roles[role or "rest"] += array.nbytes
    return roles


def bits_per_weight(total_bytes: int, parameters: int) -> float | None:
    """mlx-lm's figure (mlx_lm.utils.compute_bits_per_weight): all bytes over the logical weights."""
    return round(total_bytes * 8 / parameters, 4) if parameters else None


def device_info() -> dict:
    """Name, backend and total memory of the device MLX computes on."""
    info = mx.device_info()
    device = mx.default_device()
    backend = "cpu" if device.type == mx.cpu else ("cuda" if mx.cuda.is_available() else "metal")
    total = (info.get("max_recommended_working_set_size") or info.get("memory_size")
             or info.get("total_memory") or _system_memory())
    return {"name": str(info.get("device_name") or info.get("architecture") or backend),
            "backend": backend, "total_memory_bytes": int(total)}


def _system_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_memory() -> dict:
    return {"active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory(),
            "cache_bytes": mx.get_cache_memory()}


DEFAULT_BUDGET_SHARE = 0.75


def parse_budget(value: str | None, total: int | None = None, *, allow_zero: bool = False) -> int:
    """Bytes from "12GiB", "500MB", "123456" or a fraction of the device memory ("0.5").

    Default: three quarters of what the device reports.
    """
    total = total or device_info()["total_memory_bytes"]
    if value is None or str(value).strip() == "":
        return int(total * DEFAULT_BUDGET_SHARE)
    try:
        return parse_size(value, allow_zero=allow_zero).of(total)
    except ValueError as e:
        raise ValueError(f"memory budget {e}") from None
