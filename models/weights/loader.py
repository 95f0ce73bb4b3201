"""Load a checkpoint lazily and cast (and quantize) it to a precision parameter by parameter.

Each source tensor is read, cast or quantized, evaluated and dropped before the next one, so the
peak memory of a load is about the final size plus the largest source tensor.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from models.decode.cpu_fusion import fuse_for_cpu
from models.decode.cpu_layout import laid_out, linear_weight_paths
from models.decode.cpu_quantized import batch_quantized_on_cpu
from models.decode.gpu_quantized import prefill_quantized_on_gpu
from models.errors import EngineError, ModelLoadError
from models.mlx_lm_ext.lean_llama import lean_decode_on_cpu
from models.weights.checkpoint import VariantSpec, checkpoint_tensors, read_config, stored_floating_dtype, variant_spec
from models.weights.dtypes import AUTO, Quantization, dtype_name, mx_dtype, will_cast
from models.weights.memory import bytes_by_dtype, bytes_by_role, parameter_count
from models.weights.quantize import check_runs, quantization_config, quantization_plan, quantize_layers

log = logging.getLogger(__name__)
# (parameters done, parameters in all, the variant's bytes built so far, its bytes in all)
Progress = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class LoadStats:
    load_seconds: float
    peak_bytes: int
    final_bytes: int
    largest_source_bytes: int
    bytes_by_dtype: dict[str, int]
    parameter_count: int
    source: str  # "checkpoint" or the dtype of the resident variant it was derived from
    bytes_by_role: dict[str, int] = field(default_factory=dict)  # models.weights.memory.bytes_by_role
    warmup_seconds: float = 0.0  # kernels compiled for request shapes after the load (models.weights.registry)

    @property
    def peak_over_final(self) -> float:
        return self.peak_bytes / self.final_bytes if self.final_bytes else 0.0


@dataclass
class LoadedModel:
    name: str
    path: Path
    dtype: str  # the variant's precision name (models.weights.checkpoint.VariantSpec.key)
    model: nn.Module
    tokenizer: Any
    config: dict
    stats: LoadStats
    context_length: int = field(default=0)
    float_dtype: str = ""  # the dtype of the floating parameters (the rest of a quantized variant)
    quantization: Quantization | None = None  # how its quantized layers are stored; None: float only


def resolve_auto(folder: Path) -> str:
    """The checkpoint's own floating dtype, read from the safetensors headers."""
    return stored_floating_dtype(checkpoint_tensors(folder))


def cast_parameters(model: nn.Module, dtype: str, progress: Progress | None = None) -> int:
    """Cast (set_dtype semantics + cast_predicate) and evaluate one parameter at a time; on the CPU,
    Linear weights also take the layout their dtype multiplies fastest in (models.decode.cpu_layout).

    Returns the largest source tensor in bytes. `dtype` "auto" evaluates without casting. Layers
    swapped for quantized ones (models.weights.quantize) are quantized here, as their outputs are evaluated.
    """
    target = None if dtype == AUTO else mx_dtype(dtype)
    predicate = getattr(model, "cast_predicate", None)
    params = tree_flatten(model.parameters())
    linear_weights = linear_weight_paths(model)
    largest, bytes_done = 0, 0

    def casts(path: str, source: mx.array) -> bool:
        return target is not None and source.dtype != target and will_cast(path, dtype_name(source.dtype), predicate)

    # the variant's bytes, from shapes and dtypes (nothing is evaluated): for the load's progress
    bytes_total = sum(a.size * target.size if casts(p, a) else a.nbytes for p, a in params)
    for i, (path, source) in enumerate(params):
        params[i] = None  # our list must not keep the source alive either
        largest = max(largest, source.nbytes)
        cast = casts(path, source)
        if path in linear_weights:
            value = laid_out(source, target if cast else None)
        elif cast:
            value = source.astype(target)
        else:
            value = source
        bytes_done += value.nbytes
        # Swap into the model first and drop our handle, so the source is freed right after eval.
        model.update(tree_unflatten([(path, value)]), strict=False)
        del source
        mx.eval(value)
        del value
        if progress is not None:
            progress(i + 1, len(params), bytes_done, bytes_total)
    return largest


def shard_model(model: nn.Module, group: Any) -> None:
    """Split `model` tensor-parallel over `group` with its own mlx-lm `shard` (lazy: nothing is read)."""
    if not hasattr(model, "shard"):
        raise ModelLoadError(f"{type(model).__module__.rsplit('.', 1)[-1]} models have no tensor-parallel split "
                             "in mlx-lm (no model.shard): they cannot be served with --distributed tensor")
    model.shard(group)


def context_length(config: dict) -> int:
    """The model's context in tokens, from its config (4096 if it names none)."""
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def _specialize_for_device(model: nn.Module) -> None:
    """Give the converted model's modules their faster twins for this device (same parameters)."""
    fuse_for_cpu(model)
    lean_decode_on_cpu(model)
    batch_quantized_on_cpu(model)
    prefill_quantized_on_gpu(model)


def load_variant(name: str, folder: Path, dtype: str, trust_remote_code: bool = False,
                 progress: Progress | None = None, shard_group: Any = None) -> LoadedModel:
    """Load `folder` at precision `dtype` (a canonical name): floating parameters cast and the
    planned layers quantized while loading. With `shard_group` (an mx.distributed.Group), only this
    rank's tensor-parallel shard is kept: the model is split (mlx-lm's `model.shard`) before any
    tensor is evaluated, so each tensor is read, sliced and cast one at a time."""
    read_config(folder)  # clear errors naming the broken file, before mlx-lm's own
    checkpoint_tensors(folder)
    spec = variant_spec(folder, dtype)
    if spec.quantize:
        check_runs(spec.quantization, spec.float_dtype)
    base, start = _start_measuring()
    # mlx-lm and safetensors raise many types: each stage names the files it reads, never a path.
    with _loading(name, f"{folder.name}/config.json and model*.safetensors"):
        model, config = mlx_lm_load_model(folder, lazy=True, trust_remote_code=trust_remote_code)
    with _loading(name, f"{folder.name}/model*.safetensors"):
        largest, config = _convert(model, config, spec, progress or log_progress(name, spec.key), shard_group)
        _specialize_for_device(model)
    with _loading(name, f"{folder.name}'s tokenizer files (tokenizer.json, tokenizer_config.json)"):
        tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    stats = _load_stats(model, base, start, largest, source="checkpoint")
    return LoadedModel(name, folder, spec.key, model, tokenizer, config, stats, context_length(config),
                       spec.float_dtype, spec.quantization)


def _convert(model: nn.Module, config: dict, spec: VariantSpec, progress: Progress | None,
             shard_group: Any = None) -> tuple[int, dict]:
    """Quantize (lazily, per the plan) and cast `model` in place, evaluating one parameter at a time;
    (the largest source tensor in bytes, the config with the "quantization" entry mlx-lm would write).
    With `shard_group`, the (lazily quantized) model is split first: only this rank's shard is evaluated."""
    largest = max((a.nbytes for _, a in tree_flatten(model.parameters())), default=0)  # unevaluated: free
    if spec.quantize:
        plan = quantization_plan(model, spec.quantization)
        quantize_layers(model, plan, spec.float_dtype)
        entry = quantization_config(plan, spec.quantization)
        config = {**config, "quantization": entry, "quantization_config": entry}
    if shard_group is not None:
        shard_model(model, shard_group)
    return max(largest, cast_parameters(model, spec.float_dtype, progress)), config


def log_progress(name: str, key: str) -> Progress:
    """Log a load's progress at every quarter of its parameters."""
    logged = [0]

    def report(done: int, total: int, bytes_done: int = 0, bytes_total: int = 0) -> None:
        quarter = done * 4 // max(total, 1)
        if quarter > logged[0]:
            logged[0] = quarter
            log.info("loading %s/%s: %d%% (%d of %d tensors, %d of %d bytes)", name, key, quarter * 25, done, total,
                     bytes_done, bytes_total)

    return report


@contextmanager
def _loading(name: str, files: str) -> Iterator[None]:
    """Turn any failure while reading `files` into a ModelLoadError that names them."""
    try:
        yield
    except EngineError:  # already a clear error (a precision this model cannot have, a named file)
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
        parameter_count=parameter_count(model), source=source, bytes_by_role=bytes_by_role(model),
    )


def _short(e: Exception) -> str:
    """An exception message without filesystem paths."""
    lines = str(e).splitlines()
    text = " ".join(lines[:2]) if lines and lines[0].rstrip().endswith(":") else (lines[0] if lines else "")
    return " ".join(w if "/" not in w else Path(w.strip("'\",")).name for w in text.split())[:300]


def derive_variant(source: LoadedModel, dtype: str, trust_remote_code: bool = False,
                   progress: Progress | None = None) -> LoadedModel:
    """A new precision of a resident variant, cast and quantized from its arrays without reading the
    checkpoint.

    Exact only when `source` holds the checkpoint's values exactly (its own dtype, or float32
    for a 16-bit checkpoint); the registry only calls it then.
    """
    spec = variant_spec(source.path, dtype)
    if spec.quantize:
        check_runs(spec.quantization, spec.float_dtype)
    base, start = _start_measuring()
    # The structure comes from the checkpoint lazily; its arrays are replaced by the resident
    # ones (never read from the file), then cast like a load from the file.
    model, config = mlx_lm_load_model(source.path, lazy=True, trust_remote_code=trust_remote_code)
    model.update(source.model.parameters())
    largest, config = _convert(model, config, spec, progress or log_progress(source.name, spec.key))
    _specialize_for_device(model)
    stats = _load_stats(model, base, start, largest, source=source.dtype)
    return LoadedModel(source.name, source.path, spec.key, model, source.tokenizer, config, stats,
                       source.context_length, spec.float_dtype, spec.quantization)
