"""What a variant will hold before it is loaded, from the safetensors headers alone (and, for a
quantization, the model's structure built from its config without computing anything)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from models.checkpoint import TensorInfo, VariantSpec, checkpoint_tensors, read_config, variant_spec
from models.dtypes import (
    BYTES_PER_ELEMENT,
    FLOATING,
    SAFETENSORS_DTYPES,
    STANDARD_QUANTIZATIONS,
    is_floating,
    will_cast,
)
from models.errors import PrecisionUnavailableError

_ELEMENT_BYTES = {name: size for name, size in SAFETENSORS_DTYPES.values()}


def model_cast_predicate(config: dict) -> Callable[[str], bool] | None:
    """The model class's cast_predicate, without building the model (they do not use `self`)."""
    try:
        from mlx_lm.utils import _get_classes

        model_class, _ = _get_classes(config)
        prop = getattr(model_class, "cast_predicate", None)
        return prop.fget(None) if isinstance(prop, property) else None
    except Exception:
        return None


def _planned_layers(config: dict, spec: VariantSpec) -> dict[str, dict]:
    """The quantization plan on the model's structure, built from the config and never evaluated
    (MLX is lazy: the random initial weights are never computed)."""
    from mlx_lm.utils import _get_classes

    from models.quantize import quantization_plan

    try:
        model_class, args_class = _get_classes(config)
        skeleton = model_class(args_class.from_dict(config))
    except Exception as e:
        raise PrecisionUnavailableError(f"cannot plan {spec.key} for this model: {type(e).__name__}") from None
    return quantization_plan(skeleton, spec.quantization).layers


def _quantized_bytes(t: TensorInfo, params: dict, float_dtype: str) -> dict[str, int]:
    """Bytes of one weight quantized with `params`: packed uint32 weights, scales (float for affine,
    uint8 for the microscaling modes) and affine biases."""
    count = t.nbytes // int(_ELEMENT_BYTES[t.dtype])
    groups = count // params["group_size"]
    out = {"uint32": count * params["bits"] // 8}
    if params.get("mode", "affine") == "affine":
        out[float_dtype] = 2 * groups * BYTES_PER_ELEMENT[float_dtype]
    else:
        out["uint8"] = groups
    return out


def estimate_variant(folder: Path, dtype: str) -> dict:
    """Bytes by parameter dtype, total bytes, parameter count and bits per weight of (folder, dtype)."""
    tensors = checkpoint_tensors(folder)
    config = read_config(folder)
    spec = variant_spec(folder, dtype)
    predicate = model_cast_predicate(config)
    plan = _planned_layers(config, spec) if spec.quantize else {}
    by_dtype: dict[str, int] = defaultdict(int)
    params = 0
    for t in tensors.values():
        if "rotary_emb.inv_freq" in t.name:  # dropped by mlx-lm's sanitize
            continue
        count = t.nbytes // max(int(_ELEMENT_BYTES[t.dtype]), 1)
        module, _, leaf = t.name.rpartition(".")
        if leaf == "weight" and module in plan and is_floating(t.dtype):
            for d, n in _quantized_bytes(t, plan[module], spec.float_dtype).items():
                by_dtype[d] += n
        elif will_cast(t.name, t.dtype, predicate):
            by_dtype[spec.float_dtype] += count * BYTES_PER_ELEMENT[spec.float_dtype]
        else:
            by_dtype[t.dtype] += t.nbytes
        if leaf == "weight" and t.dtype == "uint32" and f"{module}.scales" in tensors and spec.quantization:
            count = count * 32 // spec.quantization.bits  # a stored quantized weight: its logical size
        params += count
    total = sum(by_dtype.values())
    return {"dtype": spec.key, "float_dtype": spec.float_dtype,
            "quantization": spec.quantization.name if spec.quantization else None,
            "bytes_by_dtype": dict(sorted(by_dtype.items())), "total_bytes": total, "parameter_count": params,
            "bits_per_weight": round(total * 8 / params, 4) if params else None}


def estimate_all(folder: Path, include_quantized: bool = False) -> list[dict]:
    """The float dtypes, and with `include_quantized` the standard quantizations (a quantized
    checkpoint has only its own)."""
    names = list(FLOATING)
    if include_quantized:
        names += STANDARD_QUANTIZATIONS
    out: list[dict] = []
    for name in names:
        try:
            estimate = estimate_variant(folder, name)
        except PrecisionUnavailableError:  # another quantization of a quantized checkpoint
            continue
        if all(e["dtype"] != estimate["dtype"] for e in out):  # its own quantization: a float name's variant
            out.append(estimate)
    return out


def kv_cache_bytes(config: dict, float_dtype: str, sequences: int, context: int) -> int:
    """Keys and values of `sequences` sequences of `context` tokens, in the activations' dtype:
    what `fit` keeps free beside the weights."""
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text.get("hidden_size", 0) // max(heads, 1))
    return 2 * layers * kv_heads * head_dim * context * sequences * BYTES_PER_ELEMENT[float_dtype]
