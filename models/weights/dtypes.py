"""Precision names (float dtypes and quantizations), aliases and the cast rule. Pure Python: the
server validates names with it.

A precision names the quantized weights and the float dtype of everything else: `float16` (no
quantized weights), `q4` (affine 4-bit, group size 64, the rest in the model's default float dtype),
`q4g32` (group size 32), `q4:float16` (the rest in float16), `mxfp4`, `mixed_3_6` (mlx-lm's recipe).
A variant's name may end in its KV cache's precision: `q4+kv8` (the weights of `q4`, an 8-bit KV cache),
`bfloat16+kv4`, `q4+float` (the float KV cache where the server's default is quantized).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.errors import UnknownDtypeError

AUTO = "auto"
FIT = "fit"  # the highest precision of an order whose estimate fits the budget (models.weights.registry)
FLOATING = ("float32", "float16", "bfloat16")
DTYPE_NAMES = (AUTO, *FLOATING)
# Documented aliases, as vLLM and PyTorch users write them.
ALIASES = {
    "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16",
    "bf16": "bfloat16",
}

AFFINE_BITS = (8, 6, 5, 4, 3, 2)
AFFINE_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's default for affine quantization
# MLX's floating-point microscaling modes: (bits, their fixed group size)
MICROSCALING = {"mxfp8": (8, 32), "mxfp4": (4, 32), "nvfp4": (4, 16)}
# mlx-lm's mixed recipes (mlx_lm.convert --quant-predicate): (low bits, high bits), group size 64
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
# What /memory/estimate and /v1/models list besides the float dtypes
STANDARD_QUANTIZATIONS = ("q8", "q6", "q5", "q4", "q3", "q2", "mxfp8", "mxfp4", "nvfp4")
# `fit` tries these from the first (`auto`: the checkpoint's own precision); the operator may set another
DEFAULT_FIT_ORDER = (AUTO, "bfloat16", "q8", "q6", "q5", "q4")
QUANT_ALIASES = {"int8": "q8", "int4": "q4", **{f"{b}bit": f"q{b}" for b in AFFINE_BITS}}
_AFFINE = re.compile(r"^q(\d)(?:g(\d+))?$")
# KV cache precisions: the model's float dtype (the activations'), or mlx-lm's affine-quantized KV cache
KV_FLOAT = "float"
KV_BITS = {"kv8": 8, "kv4": 4}
KV_NAMES = (KV_FLOAT, *KV_BITS)
KV_ALIASES = {"kvfloat": KV_FLOAT, "auto": KV_FLOAT, "8": "kv8", "q8": "kv8", "int8": "kv8", "4": "kv4",
              "q4": "kv4", "int4": "kv4"}
KV_SEPARATOR = "+"  # `<weights precision>+<KV precision>`: q4+kv8


@dataclass(frozen=True)
class Quantization:
    """How the quantized layers are stored: `nn.quantize`'s mode, bits and group size; `recipe` is
    one of mlx-lm's mixed recipes (per-layer bits, `bits` the low ones)."""

    mode: str
    bits: int
    group_size: int
    recipe: str | None = None

    @property
    def name(self) -> str:
        if self.recipe:
            return self.recipe
        if self.mode != "affine":
            return self.mode
        return f"q{self.bits}" + ("" if self.group_size == DEFAULT_GROUP_SIZE else f"g{self.group_size}")


@dataclass(frozen=True)
class Precision:
    """A parsed precision name. `float_dtype` None: the model's default (see `default_float_dtype`)."""

    quantization: Quantization | None
    float_dtype: str | None

    @property
    def name(self) -> str:
        base = self.quantization.name if self.quantization else (self.float_dtype or AUTO)
        if self.quantization and self.float_dtype:
            return f"{base}:{self.float_dtype}"
        return base


def _parse_quantization(key: str) -> Quantization | None:
    key = QUANT_ALIASES.get(key, key)
    if key in MICROSCALING:
        bits, group = MICROSCALING[key]
        return Quantization(key, bits, group)
    if key in RECIPES:
        return Quantization("affine", RECIPES[key][0], DEFAULT_GROUP_SIZE, recipe=key)
    match = _AFFINE.match(key)
    if match and int(match[1]) in AFFINE_BITS:
        group = int(match[2]) if match[2] else DEFAULT_GROUP_SIZE
        if group in AFFINE_GROUP_SIZES:
            return Quantization("affine", int(match[1]), group)
    return None


def parse_precision(name: Any) -> Precision:
    """The precision a name means: a float dtype, `auto`, or `<quantization>[:<float dtype>]`.

    Case-insensitive, aliases resolved; anything else raises UnknownDtypeError listing the valid names.
    """
    if not isinstance(name, str):
        raise unknown_dtype(name)
    key = name.strip().lower()
    base, colon, rest = key.partition(":")
    float_key = ALIASES.get(rest, rest) if colon else None
    if float_key is not None and float_key not in FLOATING:
        raise unknown_dtype(name)
    base = ALIASES.get(base, base)
    if base in DTYPE_NAMES and float_key is None:
        return Precision(None, None if base == AUTO else base)
    quantization = _parse_quantization(base)
    if quantization is None:
        raise unknown_dtype(name)
    return Precision(quantization, float_key)


def quantization_names() -> list[str]:
    """Every quantization's canonical name, highest precision first within each family."""
    affine = [f"q{b}" + ("" if g == DEFAULT_GROUP_SIZE else f"g{g}") for b in AFFINE_BITS for g in AFFINE_GROUP_SIZES]
    return affine + list(MICROSCALING) + list(RECIPES)


def accepted_names() -> tuple[str, ...]:
    """Every spelling a request may use (the schema's enum): names, aliases, group sizes, float suffixes."""
    bases = quantization_names() + [f"q{b}g{DEFAULT_GROUP_SIZE}" for b in AFFINE_BITS] + list(QUANT_ALIASES)
    suffixed = [f"{b}:{f}" for b in bases for f in FLOATING]
    names = (*DTYPE_NAMES, FIT, *ALIASES, *bases, *suffixed)
    return (*names, *(f"{n}{KV_SEPARATOR}{kv}" for n in names for kv in KV_NAMES))


def default_float_dtype(stored: str) -> str:
    """The float dtype of a quantized variant's rest when the name sets none: the checkpoint's own,
    bfloat16 for a float32 checkpoint (what quantized checkpoints on the hub mostly use)."""
    return "bfloat16" if stored not in ("float16", "bfloat16") else stored


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
        f"unknown dtype {name!r}; valid: {', '.join(DTYPE_NAMES)}, {FIT}, "
        f"{', '.join(quantization_names())}; a quantization may name the float dtype of the rest "
        f"(q4:float16) (aliases: {', '.join(f'{k}={v}' for k, v in {**ALIASES, **QUANT_ALIASES}.items())})"
    )


def normalize_dtype(name: Any) -> str:
    """Canonical precision name for `name` (case-insensitive, aliases resolved): `auto`, `fit`, a
    float dtype, or a quantization with an optional `:<float dtype>`; then an optional `+<KV precision>`
    (`q4+kv8`), kept as written (also `+float`: the server's default KV precision does not apply)."""
    if isinstance(name, str) and KV_SEPARATOR in name:
        weights, _, kv = name.partition(KV_SEPARATOR)
        return f"{normalize_dtype(weights)}{KV_SEPARATOR}{normalize_kv(kv, name)}"
    if isinstance(name, str) and name.strip().lower() == FIT:
        return FIT
    return parse_precision(name).name


def normalize_kv(name: Any, whole: Any = None) -> str:
    """Canonical KV precision name (`float`, `kv8`, `kv4`; aliases 8, q8, int8, 4, q4, int4, kvfloat);
    anything else raises UnknownDtypeError (naming `whole`, the variant name it came in, if given)."""
    key = name.strip().lower() if isinstance(name, str) else None
    key = KV_ALIASES.get(key, key)
    if key not in KV_NAMES:
        raise UnknownDtypeError(f"unknown KV cache precision {name!r}" + (f" in {whole!r}" if whole else "")
                                + f"; valid: {', '.join(KV_NAMES)} (e.g. q4+kv8: q4 weights, an 8-bit KV cache)")
    return key


def split_kv(name: str) -> tuple[str, str | None]:
    """A canonical variant name's (weights precision, KV precision or None where it names none)."""
    weights, separator, kv = name.partition(KV_SEPARATOR)
    return weights, (kv if separator else None)


def variant_name(weights: str, kv: str) -> str:
    """A variant's canonical name: its weights' precision, and `+<kv>` unless the KV cache is float."""
    return weights if kv == KV_FLOAT else f"{weights}{KV_SEPARATOR}{kv}"


def kv_bits(kv: str) -> int | None:
    """The bits of a KV precision's quantized cache; None for the float one."""
    return KV_BITS.get(kv)


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
