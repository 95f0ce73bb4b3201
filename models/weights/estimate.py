"""What a variant will hold before it is loaded, from the safetensors headers alone (and, for a
quantization, the model's structure built from its config without computing anything)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from models.errors import ModelLoadError, PrecisionUnavailableError
from models.mlx_lm_ext.internals import model_class, model_classes
from models.weights.checkpoint import TensorInfo, VariantSpec, checkpoint_tensors, read_config, variant_spec
from models.weights.dtypes import (
    BYTES_PER_ELEMENT,
    FLOATING,
    SAFETENSORS_DTYPES,
    STANDARD_QUANTIZATIONS,
    is_floating,
    kv_bits,
    variant_name,
    will_cast,
)

_ELEMENT_BYTES = {name: size for name, size in SAFETENSORS_DTYPES.values()}


def model_cast_predicate(config: dict) -> Callable[[str], bool] | None:
    """The model class's cast_predicate, without building the model (they do not use `self`)."""
    prop = getattr(model_class(config), "cast_predicate", None)
    try:
        return prop.fget(None) if isinstance(prop, property) else None
    except Exception:  # a predicate that reads the model after all
        return None


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
MAX_LAYERS = 1024  # more than any released model; a config beyond it builds for minutes and then fails
# The least bytes a weight element can take (2-bit quantization): what a config's shapes cost at least.
_MIN_ELEMENT_BYTES = 0.25


def _config_value(config: dict, keys: tuple[str, ...]) -> int | None:
    for scope in (config, config.get("text_config") or {}):
        for key in keys:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def check_config(folder: Path, config: dict, tensors: dict) -> None:
    """Refuse a config that cannot be sane before anything is built: mlx-lm builds every layer the config
    declares (100,000 layers held the worker for 40 s) and only then finds the weights missing."""
    declared = _config_value(config, _LAYER_COUNT_KEYS)
    if declared is None:
        return
    stored = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.search(name))}
    present = max(stored) + 1 if stored else 0
    if declared < 0 or declared > MAX_LAYERS or (present and declared > present):
        held = f"the checkpoint holds {present}" if present else f"at most {MAX_LAYERS} are supported"
        raise ModelLoadError(f"{folder.name}/config.json declares {declared} layers, but {held}")


def config_floor_bytes(config: dict) -> int:
    """The least bytes the shapes a config declares take (embedding and attention at 2 bits a weight),
    whatever the checkpoint holds: a config beyond the budget by this measure can never be loaded."""
    hidden = max(_config_value(config, ("hidden_size", "n_embd", "d_model")) or 0, 0)
    vocab = max(_config_value(config, ("vocab_size",)) or 0, 0)
    layers = max(_config_value(config, _LAYER_COUNT_KEYS) or 0, 0)
    return int((vocab * hidden + layers * 4 * hidden * hidden) * _MIN_ELEMENT_BYTES)


def _planned_layers(config: dict, spec: VariantSpec) -> dict[str, dict]:
    """The quantization plan on the model's structure, built from the config and never evaluated
    (MLX is lazy: the random initial weights are never computed)."""
    from models.weights.quantize import quantization_plan

    try:
        model_type, args_type = model_classes(config)
        skeleton = model_type(args_type.from_dict(config))
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


# The projections mlx-lm's tensor-parallel `shard` splits across ranks (llama and its kin); everything else
# (embeddings, norms, the head, a sharded-to-all layer's bias) is whole on every rank.
_SHARDED = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(weight|scales|biases|bias)$")
_WHOLE_BIAS = re.compile(r"\.(o_proj|down_proj)\.bias$")


def rank_share(name: str, ranks: int) -> float:
    """The share of tensor `name` one of `ranks` tensor-parallel ranks holds."""
    return 1 / ranks if _SHARDED.search(name) and not _WHOLE_BIAS.search(name) else 1.0


def estimate_variant(folder: Path, dtype: str, ranks: int = 1) -> dict:
    """Bytes by parameter dtype, total bytes, parameter count and bits per weight of (folder, dtype); a
    config that cannot be sane is refused (ModelLoadError). With `ranks` > 1, also the bytes one rank of
    a tensor-parallel group holds (`per_rank_bytes`: its share of the split projections, the rest whole)."""
    tensors = checkpoint_tensors(folder)
    config = read_config(folder)
    check_config(folder, config, tensors)
    spec = variant_spec(folder, dtype)
    predicate = model_cast_predicate(config)
    plan = _planned_layers(config, spec) if spec.quantize else {}
    by_dtype: dict[str, int] = defaultdict(int)
    params = 0
    per_rank = 0.0
    for t in tensors.values():
        if "rotary_emb.inv_freq" in t.name:  # dropped by mlx-lm's sanitize
            continue
        count = t.nbytes // max(int(_ELEMENT_BYTES[t.dtype]), 1)
        module, _, leaf = t.name.rpartition(".")
        before = sum(by_dtype.values())
        if leaf == "weight" and module in plan and is_floating(t.dtype):
            for d, n in _quantized_bytes(t, plan[module], spec.float_dtype).items():
                by_dtype[d] += n
        elif will_cast(t.name, t.dtype, predicate):
            by_dtype[spec.float_dtype] += count * BYTES_PER_ELEMENT[spec.float_dtype]
        else:
            by_dtype[t.dtype] += t.nbytes
        per_rank += (sum(by_dtype.values()) - before) * rank_share(t.name, ranks)  # a quantized weight's scales too
        if leaf == "weight" and t.dtype == "uint32" and f"{module}.scales" in tensors and spec.quantization:
            count = count * 32 // spec.quantization.bits  # a stored quantized weight: its logical size
        params += count
    total = sum(by_dtype.values())
    return {"dtype": spec.key, "float_dtype": spec.float_dtype,
            "quantization": spec.quantization.name if spec.quantization else None,
            "bytes_by_dtype": dict(sorted(by_dtype.items())), "total_bytes": total, "parameter_count": params,
            "bits_per_weight": round(total * 8 / params, 4) if params else None,
            **({"ranks": ranks, "per_rank_bytes": round(per_rank)} if ranks > 1 else {})}


def estimate_all(folder: Path, include_quantized: bool = False, ranks: int = 1) -> list[dict]:
    """The float dtypes, and with `include_quantized` the standard quantizations (a quantized
    checkpoint has only its own)."""
    names = list(FLOATING)
    if include_quantized:
        names += STANDARD_QUANTIZATIONS
    out: list[dict] = []
    for name in names:
        try:
            estimate = estimate_variant(folder, name, ranks)
        except PrecisionUnavailableError:  # another quantization of a quantized checkpoint
            continue
        if all(e["dtype"] != estimate["dtype"] for e in out):  # its own quantization: a float name's variant
            out.append(estimate)
    return out


KV_GROUP_SIZE = 64  # mlx-lm's kv_group_size; 32 where 64 does not divide the head size


def kv_shape(config: dict) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a config's attention."""
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text.get("hidden_size", 0) // max(heads, 1))
    return layers, kv_heads, head_dim


def kv_group_size(config: dict) -> int:
    """The group size a quantized KV cache of this model uses (mx.quantize needs it to divide the head size)."""
    head_dim = kv_shape(config)[2]
    return next((g for g in (KV_GROUP_SIZE, 32) if head_dim and head_dim % g == 0), KV_GROUP_SIZE)


def kv_bytes_per_token(config: dict, float_dtype: str, bits: int | None = None) -> int:
    """Bytes of one token's keys and values over all layers: in the float dtype, or quantized to `bits`
    as QuantizedKVCache stores them (packed codes, and a float scale and bias per group)."""
    layers, kv_heads, head_dim = kv_shape(config)
    width = BYTES_PER_ELEMENT[float_dtype]
    if bits is None:
        per_head = head_dim * width
    else:
        per_head = head_dim * bits // 8 + 2 * (head_dim // kv_group_size(config)) * width
    return 2 * layers * kv_heads * per_head


def kv_cache_bytes(config: dict, float_dtype: str, sequences: int, context: int, bits: int | None = None) -> int:
    """Keys and values of `sequences` sequences of `context` tokens, in the activations' dtype or quantized
    to `bits`: what `fit` keeps free beside the weights."""
    return kv_bytes_per_token(config, float_dtype, bits) * context * sequences


def with_kv_estimate(entry: dict, config: dict, kv: str, sequences: int, context: int) -> dict:
    """An estimate_variant entry named as the variant of KV precision `kv` (`q4+kv8`), with its KV cache:
    bytes per token, and for `sequences` sequences of `context` tokens (the model's context)."""
    bits = kv_bits(kv)
    per_token = kv_bytes_per_token(config, entry["float_dtype"], bits)
    return {**entry, "dtype": variant_name(entry["dtype"], kv),
            "kv_cache": {"dtype": kv, "bits": bits, "group_size": kv_group_size(config) if bits else None,
                         "bytes_per_token": per_token, "sequences": sequences, "context": context,
                         "bytes": per_token * sequences * context}}
