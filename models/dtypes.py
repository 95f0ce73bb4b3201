"""dtype names, aliases and the cast rule. Pure Python: the server validates names with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.errors import UnknownDtypeError

AUTO = "auto"
FLOATING = ("float32", "float16", "bfloat16")
DTYPE_NAMES = (AUTO, *FLOATING)
# Documented aliases, as vLLM and PyTorch users write them.
ALIASES = {
    "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16",
    "bf16": "bfloat16",
}

# safetensors header dtype -> (our name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, float]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3", 1), "F8_E5M2": ("float8_e5m2", 1),
}
FLOATING_NAMES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3", "float8_e5m2"})
BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


def unknown_dtype(name: Any) -> UnknownDtypeError:
    return UnknownDtypeError(
        f"unknown dtype {name!r}; valid: {', '.join(DTYPE_NAMES)} "
        f"(aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())})"
    )


def normalize_dtype(name: Any) -> str:
    """Canonical dtype name for `name` (case-insensitive, aliases resolved)."""
    if not isinstance(name, str):
        raise unknown_dtype(name)
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DTYPE_NAMES:
        raise unknown_dtype(name)
    return key


def is_floating(dtype_name: str) -> bool:
    """The floating-only predicate of `nn.Module.set_dtype`, on dtype names."""
    return dtype_name in FLOATING_NAMES


def will_cast(path: str, dtype_name: str, cast_predicate: Callable[[str], bool] | None) -> bool:
    """Whether a parameter is cast: floating, and not kept by the model's own cast_predicate."""
    if not is_floating(dtype_name):
        return False
    return cast_predicate is None or bool(cast_predicate(path))


def mx_dtype(name: str):  # -> mx.Dtype; mlx is imported lazily so this module stays pure
    import mlx.core as mx

    return getattr(mx, name)


def dtype_name(dtype: Any) -> str:
    """`mx.bfloat16` -> "bfloat16"."""
    return str(dtype).rsplit(".", 1)[-1]
