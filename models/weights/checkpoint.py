"""Read an mlx-lm checkpoint folder without loading weights: config, safetensors headers."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelLoadError, PrecisionUnavailableError
from models.weights.dtypes import (
    SAFETENSORS_DTYPES,
    Quantization,
    default_float_dtype,
    is_floating,
    parse_precision,
)

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_config(folder: Path) -> dict:
    """The parsed config.json; every way it can be broken is a ModelLoadError naming the file."""
    path = folder / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{folder.name}/config.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{folder.name}/config.json is not valid JSON ({type(e).__name__})") from None
    except RecursionError:
        raise ModelLoadError(f"{folder.name}/config.json is nested too deeply to parse") from None
    except OSError as e:  # a folder, a dangling link, no permission...
        raise ModelLoadError(f"{folder.name}/config.json cannot be read ({_os_reason(e)})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder.name}/config.json is not a JSON object")
    return config


def _os_reason(e: OSError) -> str:
    """Why a file could not be read, without its path."""
    return e.strerror or type(e).__name__


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder.name} has no model*.safetensors file")
    for path in files:
        if not path.is_file():
            raise ModelLoadError(f"{folder.name}/{path.name} is not a regular file")
    return files


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one file's header and check that every tensor lies inside the file."""
    label = f"{path.parent.name}/{path.name}"
    try:
        header, size, header_len = _read_header(path, label)
    except OSError as e:
        raise ModelLoadError(f"{label} cannot be read ({_os_reason(e)})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{label} has a corrupt header")
    data_size = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, element_bytes = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
            if any(d < 0 for d in shape) or not 0 <= start <= end:
                raise ValueError("negative size or offsets")
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{label}: tensor {name!r} has an invalid header entry") from None
        count = 1
        for d in shape:
            count *= d
        nbytes = int(count * element_bytes)
        if end > data_size or end - start != nbytes:
            raise ModelLoadError(f"{label} is truncated or corrupt at tensor {name!r}")
        tensors[name] = TensorInfo(name, dtype, shape, nbytes)
    return tensors


def _read_header(path: Path, label: str) -> tuple[object, int, int]:
    """(parsed JSON header, file size, header length) of a safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{label} is truncated (no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ModelLoadError(f"{label} is corrupt or truncated (header length {header_len})")
        try:
            return json.loads(f.read(header_len)), size, header_len
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{label} has a corrupt header") from None
        except RecursionError:
            raise ModelLoadError(f"{label} has a corrupt header (nested too deeply)") from None


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(folder):
        tensors.update(read_safetensors_header(path))
    return tensors


def stored_floating_dtype(tensors: dict[str, TensorInfo]) -> str:
    """The dtype holding most of the checkpoint's floating bytes: what `auto` means."""
    by_dtype: dict[str, int] = defaultdict(int)
    for t in tensors.values():
        if is_floating(t.dtype):
            by_dtype[t.dtype] += t.nbytes
    if not by_dtype:
        return "float32"
    return max(by_dtype, key=by_dtype.get)


@dataclass(frozen=True)
class VariantSpec:
    """What a precision name means for one checkpoint.

    `key`: the variant's canonical name (the float dtype of the rest is left out when it is the
    model's default); `quantization`: the layers' storage (None: float only); `quantize`: whether the
    loader quantizes (False for a checkpoint that is quantized already, served as it is)."""

    key: str
    float_dtype: str
    quantization: Quantization | None
    quantize: bool


def stored_quantization(config: dict) -> Quantization | None:
    """The quantization of an already-quantized mlx-lm checkpoint (its config's "quantization")."""
    entry = config.get("quantization") or config.get("quantization_config")
    if not isinstance(entry, dict) or "bits" not in entry:
        return None
    try:
        return Quantization(str(entry.get("mode", "affine")), int(entry["bits"]), int(entry.get("group_size", 64)))
    except (TypeError, ValueError):
        return None


def variant_spec(folder: Path, name: str) -> VariantSpec:
    """Resolve a canonical precision name (not `fit`) against the checkpoint in `folder`.

    A quantized checkpoint is served as it is: `auto`, a float dtype (for the rest) or its own
    quantization; another quantization is refused (requantizing would compound the rounding).
    """
    stored_float = stored_floating_dtype(checkpoint_tensors(folder))
    stored = stored_quantization(read_config(folder))
    precision = parse_precision(name)
    wanted = precision.quantization
    if stored is not None:
        same = wanted is None or (wanted.mode, wanted.bits, wanted.group_size, wanted.recipe) == (
            stored.mode, stored.bits, stored.group_size, None)
        if not same:
            raise PrecisionUnavailableError(
                f"{folder.name} is already quantized ({stored.name}); it is served as it is: ask for auto, "
                f"{stored.name} or a float dtype for its unquantized rest, not {wanted.name}")
        float_dtype = precision.float_dtype or stored_float
        return VariantSpec(float_dtype, float_dtype, stored, quantize=False)
    if wanted is None:
        float_dtype = precision.float_dtype or stored_float
        return VariantSpec(float_dtype, float_dtype, None, quantize=False)
    default = default_float_dtype(stored_float)
    float_dtype = precision.float_dtype or default
    key = wanted.name if float_dtype == default else f"{wanted.name}:{float_dtype}"
    return VariantSpec(key, float_dtype, wanted, quantize=True)
