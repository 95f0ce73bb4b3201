"""Read an mlx-lm checkpoint folder without loading weights: config, safetensors headers."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from models.dtypes import SAFETENSORS_DTYPES, is_floating
from models.errors import ModelLoadError

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
