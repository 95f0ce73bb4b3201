"""What a variant will hold before it is loaded, from the safetensors headers alone."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from models.checkpoint import checkpoint_tensors, read_config, stored_floating_dtype
from models.dtypes import AUTO, BYTES_PER_ELEMENT, FLOATING, SAFETENSORS_DTYPES, will_cast
from models.errors import ModelLoadError
from models.mlx_lm_ext.internals import model_class

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


def estimate_variant(folder: Path, dtype: str) -> dict:
    """Bytes by parameter dtype, total bytes and parameter count of (folder, dtype); a config that cannot
    be sane is refused (ModelLoadError)."""
    tensors = checkpoint_tensors(folder)
    config = read_config(folder)
    check_config(folder, config, tensors)
    predicate = model_cast_predicate(config)
    concrete = stored_floating_dtype(tensors) if dtype == AUTO else dtype
    by_dtype: dict[str, int] = defaultdict(int)
    params = 0
    for t in tensors.values():
        if "rotary_emb.inv_freq" in t.name:  # dropped by mlx-lm's sanitize
            continue
        count = t.nbytes // max(int(_ELEMENT_BYTES[t.dtype]), 1)
        params += count
        if will_cast(t.name, t.dtype, predicate):
            by_dtype[concrete] += count * BYTES_PER_ELEMENT[concrete]
        else:
            by_dtype[t.dtype] += t.nbytes
    return {"dtype": concrete, "bytes_by_dtype": dict(sorted(by_dtype.items())),
            "total_bytes": sum(by_dtype.values()), "parameter_count": params}


def estimate_all(folder: Path) -> list[dict]:
    return [estimate_variant(folder, d) for d in FLOATING]
