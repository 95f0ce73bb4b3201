"""What a variant will hold before it is loaded, from the safetensors headers alone."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from models.checkpoint import checkpoint_tensors, read_config, stored_floating_dtype
from models.dtypes import AUTO, BYTES_PER_ELEMENT, FLOATING, SAFETENSORS_DTYPES, will_cast
from models.mlx_lm_ext.internals import model_class

_ELEMENT_BYTES = {name: size for name, size in SAFETENSORS_DTYPES.values()}


def model_cast_predicate(config: dict) -> Callable[[str], bool] | None:
    """The model class's cast_predicate, without building the model (they do not use `self`)."""
    prop = getattr(model_class(config), "cast_predicate", None)
    try:
        return prop.fget(None) if isinstance(prop, property) else None
    except Exception:  # a predicate that reads the model after all
        return None


def estimate_variant(folder: Path, dtype: str) -> dict:
    """Bytes by parameter dtype, total bytes and parameter count of (folder, dtype)."""
    tensors = checkpoint_tensors(folder)
    config = read_config(folder)
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
