"""Which layers a quantization covers, and quantizing them while loading.

The layers are those `mlx_lm.convert -q` quantizes with the same settings (mlx_lm.utils.quantize_model):
modules with `to_quantized`, whose weight's last dimension the group size divides, filtered by the
model's own `quant_predicate` or by one of mlx-lm's mixed recipes, which may set per-layer bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from models.errors import PrecisionUnavailableError
from models.weights.dtypes import Quantization, mx_dtype

LayerParams = dict[str, Any]  # to_quantized's keyword arguments: group_size, bits, mode


@dataclass(frozen=True)
class QuantizationPlan:
    """Module path -> to_quantized parameters; `per_layer`: the paths whose parameters the predicate
    chose (mlx-lm records those in the config's "quantization" entry)."""

    layers: dict[str, LayerParams]
    per_layer: frozenset[str]


def _predicate(model: nn.Module, quantization: Quantization) -> Callable[[str, nn.Module], bool | dict] | None:
    if quantization.recipe:
        from mlx_lm.convert import mixed_quant_predicate_builder

        try:
            return mixed_quant_predicate_builder(quantization.recipe, model, quantization.group_size)
        except (ValueError, AttributeError, TypeError):
            raise PrecisionUnavailableError(f"{quantization.recipe} needs a model with numbered layers and "
                                      f"down_proj projections; this model has none") from None
    return getattr(model, "quant_predicate", None)


def quantization_plan(model: nn.Module, quantization: Quantization) -> QuantizationPlan:
    """The layers mlx-lm's quantize_model would quantize, and how.

    `model` may be unevaluated (lazy): only shapes and module types are read.
    """
    default = {"group_size": quantization.group_size, "bits": quantization.bits, "mode": quantization.mode}
    predicate = _predicate(model, quantization)
    layers: dict[str, LayerParams] = {}
    per_layer = set()
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or "weight" not in module:
            continue
        if module.weight.shape[-1] % quantization.group_size != 0:
            continue
        chosen = True if predicate is None else predicate(path, module)
        if chosen:
            layers[path] = dict(chosen) if isinstance(chosen, dict) else dict(default)
            if isinstance(chosen, dict):
                per_layer.add(path)
    return QuantizationPlan(layers, frozenset(per_layer))


def quantize_layers(model: nn.Module, plan: QuantizationPlan, float_dtype: str) -> None:
    """Swap each planned layer for its quantized form, lazily: nothing is computed until the loader
    evaluates the new parameters one at a time (models.weights.loader.cast_parameters). The weights are cast
    to `float_dtype` first, as mlx_lm.convert does, so scales and biases come out in it."""
    target = mx_dtype(float_dtype)
    modules = dict(model.named_modules())
    swapped = []
    for path, params in plan.layers.items():
        module = modules[path]
        if mx.issubdtype(module.weight.dtype, mx.floating) and module.weight.dtype != target:
            module.weight = module.weight.astype(target)
        swapped.append((path, module.to_quantized(**params)))
    model.update_modules(tree_unflatten(swapped))


def quantization_config(plan: QuantizationPlan, quantization: Quantization) -> dict:
    """The config's "quantization" entry mlx-lm writes for this plan (with the per-layer choices)."""
    entry: dict[str, Any] = {"group_size": quantization.group_size, "bits": quantization.bits,
                             "mode": quantization.mode}
    entry.update((path, plan.layers[path]) for path in sorted(plan.per_layer, key=list(plan.layers).index))
    return entry


def check_runs(quantization: Quantization, float_dtype: str) -> None:
    """Refuse, before anything is loaded, a quantization MLX cannot run here (no kernel for the mode,
    bits or group size on this backend): a clear error instead of a crash while serving."""
    bits = {quantization.bits}
    if quantization.recipe:
        from models.weights.dtypes import RECIPES

        bits = set(RECIPES[quantization.recipe])
    for b in sorted(bits):
        error = _kernel_error(quantization.mode, b, quantization.group_size, float_dtype, str(mx.default_device()))
        if error:
            raise PrecisionUnavailableError(f"{quantization.name} ({quantization.mode}, {b} bits, group size "
                                      f"{quantization.group_size}) with {float_dtype} cannot run on this "
                                      f"backend: {error}")


@cache
def _kernel_error(mode: str, bits: int, group_size: int, float_dtype: str, device: str) -> str | None:
    """None if a tiny quantized matmul and embedding lookup run; else MLX's message."""
    try:
        dtype = mx_dtype(float_dtype)
        weight = (mx.arange(8 * 256, dtype=mx.float32).reshape(8, 256) / 2048).astype(dtype)
        packed, scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        x = mx.ones((2, 256), dtype=dtype)
        out = mx.quantized_matmul(x, packed, scales, biases[0] if biases else None, transpose=True,
                                  group_size=group_size, bits=bits, mode=mode)
        rows = mx.dequantize(packed[:1], scales[:1], biases[0][:1] if biases else None,
                             group_size=group_size, bits=bits, mode=mode)
        mx.eval(out, rows)
        return None
    except Exception as e:  # MLX raises ValueError/RuntimeError for unsupported combinations
        return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
