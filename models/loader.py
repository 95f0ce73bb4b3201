"""Load a checkpoint lazily and cast it to a dtype parameter by parameter.

Each source tensor is read, cast, evaluated and dropped before the next one, so the peak
memory of a load is about the final size plus the largest source tensor.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from models.checkpoint import checkpoint_tensors, read_config, stored_floating_dtype
from models.cpu_fusion import fuse_for_cpu
from models.cpu_layout import laid_out, linear_weight_paths
from models.dtypes import AUTO, dtype_name, mx_dtype, will_cast
from models.errors import ModelLoadError
from models.memory import bytes_by_dtype, parameter_count


@dataclass(frozen=True)
class LoadStats:
    load_seconds: float
    peak_bytes: int
    final_bytes: int
    largest_source_bytes: int
    bytes_by_dtype: dict[str, int]
    parameter_count: int
    source: str  # "checkpoint" or the dtype of the resident variant it was derived from

    @property
    def peak_over_final(self) -> float:
        return self.peak_bytes / self.final_bytes if self.final_bytes else 0.0


@dataclass
class LoadedModel:
    name: str
    path: Path
    dtype: str  # the concrete dtype of this variant's floating parameters, or "auto" if mixed
    model: nn.Module
    tokenizer: Any
    config: dict
    stats: LoadStats
    context_length: int = field(default=0)


def resolve_auto(folder: Path) -> str:
    """The checkpoint's own floating dtype, read from the safetensors headers."""
    return stored_floating_dtype(checkpoint_tensors(folder))


def cast_parameters(model: nn.Module, dtype: str) -> int:
    """Cast (set_dtype semantics + cast_predicate) and evaluate one parameter at a time; on the CPU,
    Linear weights also take the layout their dtype multiplies fastest in (models.cpu_layout).

    Returns the largest source tensor in bytes. `dtype` "auto" evaluates without casting.
    """
    target = None if dtype == AUTO else mx_dtype(dtype)
    predicate = getattr(model, "cast_predicate", None)
    params = tree_flatten(model.parameters())
    linear_weights = linear_weight_paths(model)
    largest = 0
    for i, (path, source) in enumerate(params):
        params[i] = None  # our list must not keep the source alive either
        largest = max(largest, source.nbytes)
        casts = target is not None and source.dtype != target and will_cast(path, dtype_name(source.dtype), predicate)
        if path in linear_weights:
            value = laid_out(source, target if casts else None)
        elif casts:
            value = source.astype(target)
        else:
            value = source
        # Swap into the model first and drop our handle, so the source is freed right after eval.
        model.update(tree_unflatten([(path, value)]), strict=False)
        del source
        mx.eval(value)
        del value
    return largest


def _context_length(config: dict) -> int:
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def load_variant(name: str, folder: Path, dtype: str, trust_remote_code: bool = False) -> LoadedModel:
    """Load `folder` with its floating parameters cast to `dtype` while loading."""
    read_config(folder)  # clear errors naming the broken file, before mlx-lm's own
    checkpoint_tensors(folder)
    concrete = resolve_auto(folder) if dtype == AUTO else dtype
    base, start = _start_measuring()
    # mlx-lm and safetensors raise many types: each stage names the files it reads, never a path.
    with _loading(name, f"{folder.name}/config.json and model*.safetensors"):
        model, config = mlx_lm_load_model(folder, lazy=True, trust_remote_code=trust_remote_code)
    with _loading(name, f"{folder.name}/model*.safetensors"):
        largest = cast_parameters(model, concrete)
        fuse_for_cpu(model)
    with _loading(name, f"{folder.name}'s tokenizer files (tokenizer.json, tokenizer_config.json)"):
        tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    stats = _load_stats(model, base, start, largest, source="checkpoint")
    return LoadedModel(name, folder, concrete, model, tokenizer, config, stats, _context_length(config))


@contextmanager
def _loading(name: str, files: str) -> Iterator[None]:
    """Turn any failure while reading `files` into a ModelLoadError that names them."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not load model {name!r} from {files}: {type(e).__name__}: {_short(e)}") from None


def _start_measuring() -> tuple[int, float]:
    """Reset MLX's peak counter; (active bytes before the load, start time)."""
    gc.collect()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    return base, time.perf_counter()


def _load_stats(model: nn.Module, base: int, start: float, largest: int, source: str) -> LoadStats:
    by_dtype = bytes_by_dtype(model)
    return LoadStats(
        load_seconds=time.perf_counter() - start, peak_bytes=max(mx.get_peak_memory() - base, 0),
        final_bytes=sum(by_dtype.values()), largest_source_bytes=largest, bytes_by_dtype=by_dtype,
        parameter_count=parameter_count(model), source=source,
    )


def _short(e: Exception) -> str:
    """An exception message without filesystem paths."""
    lines = str(e).splitlines()
    text = " ".join(lines[:2]) if lines and lines[0].rstrip().endswith(":") else (lines[0] if lines else "")
    return " ".join(w if "/" not in w else Path(w.strip("'\",")).name for w in text.split())[:300]


def derive_variant(source: LoadedModel, dtype: str, trust_remote_code: bool = False) -> LoadedModel:
    """A new dtype of a resident variant, cast from its arrays without reading the checkpoint.

    Exact only when `source` holds the checkpoint's values exactly (its own dtype, or float32
    for a 16-bit checkpoint); the registry only calls it then.
    """
    base, start = _start_measuring()
    # The structure comes from the checkpoint lazily; its arrays are replaced by the resident
    # ones (never read from the file), then cast like a load from the file.
    model, config = mlx_lm_load_model(source.path, lazy=True, trust_remote_code=trust_remote_code)
    model.update(source.model.parameters())
    largest = cast_parameters(model, dtype)
    fuse_for_cpu(model)
    stats = _load_stats(model, base, start, largest, source=source.dtype)
    return LoadedModel(source.name, source.path, dtype, model, source.tokenizer, config, stats,
                       source.context_length)
