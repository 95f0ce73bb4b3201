"""Resident variants (model, precision) under a byte budget, least recently used evicted first;
`fit`, the highest precision of an order that fits the budget.

Runs on the engine's worker thread only, so it needs no locks: a load in progress blocks the
worker, and concurrent requests for the same variant find it resident when their turn comes.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from models.decode.kv_usage import describe_kv, live_kv_bytes, reserved_bytes
from models.decode.prefix_cache import PrefixCache
from models.errors import (
    DtypeRefusedError,
    InvalidRequestError,
    MemoryBudgetError,
    ModelLoadError,
    PrecisionUnavailableError,
    VariantPinnedError,
)
from models.weights.catalog import ModelCatalog
from models.weights.checkpoint import VariantSpec, read_config, variant_spec
from models.weights.dtypes import (
    AUTO,
    DEFAULT_FIT_ORDER,
    FIT,
    KV_FLOAT,
    kv_bits,
    normalize_dtype,
    normalize_kv,
    split_kv,
    variant_name,
)
from models.weights.estimate import config_floor_bytes, estimate_variant, kv_cache_bytes, kv_group_size
from models.weights.loader import LoadedModel, context_length, derive_variant, load_variant, log_progress
from models.weights.memory import array_sizes, bits_per_weight, floating_dtypes, unique_bytes
from models.weights.quantize import check_runs

log = logging.getLogger(__name__)
Key = tuple[str, str]
# A model whose checkpoint failed to load is not tried again for this long: a broken folder costs one
# load, not one per request (each load holds the worker).
FAILED_LOAD_TTL_S = 60.0


@dataclass(eq=False)
class Variant:
    loaded: LoadedModel
    prefix: PrefixCache
    generator: Any = None  # mlx-lm BatchGenerator, created when two requests overlap
    scheduler: Any = None  # models.engine.scheduler.VariantScheduler: the lone stream and the batch
    jobs: dict[int, Any] = field(default_factory=dict)
    last_used: float = field(default_factory=time.time)
    requests_served: int = 0
    tokens_generated: int = 0
    kv: tuple[int, int] | None = None  # (group size, bits) of its quantized KV cache; None: float
    waiting: int = 0  # requests admitted to it that wait for KV room in the budget (models.engine.kv_admission)
    _sizes: dict[int, int] | None = field(default=None, repr=False)

    def array_sizes(self) -> dict[int, int]:
        """Its arrays' bytes by identity (models.weights.memory.array_sizes), taken once: a registered
        variant's parameters stay as loaded, and every admission asks (a walk of the model's tree)."""
        if self._sizes is None:
            self._sizes = array_sizes(self.loaded.model)
        return self._sizes

    @property
    def key(self) -> Key:
        return (self.loaded.name, self.loaded.dtype)

    @property
    def weights_dtype(self) -> str:
        """The precision of its weights (variants that differ only in KV precision share them)."""
        return split_kv(self.loaded.dtype)[0]

    @property
    def busy(self) -> bool:
        """Serving, or requests wait for it: never evicted then."""
        return bool(self.jobs) or self.waiting > 0

    def describe(self) -> dict:
        loaded, stats = self.loaded, self.loaded.stats
        quantization = loaded.quantization
        return {
            "model": loaded.name, "dtype": loaded.dtype, "float_dtype": loaded.float_dtype,
            "quantization": quantization.name if quantization else None,
            "quantization_config": loaded.config.get("quantization") if quantization else None,
            "floating_dtypes": sorted(floating_dtypes(loaded.model)),
            "bytes_by_dtype": stats.bytes_by_dtype, "bytes_by_role": stats.bytes_by_role,
            "total_bytes": stats.final_bytes, "parameter_count": stats.parameter_count,
            "bits_per_weight": bits_per_weight(stats.final_bytes, stats.parameter_count),
            "load_peak_bytes": stats.peak_bytes,
            "final_over_peak": round(stats.final_bytes / stats.peak_bytes, 4) if stats.peak_bytes else None,
            "load_seconds": round(stats.load_seconds, 4), "warmup_seconds": round(stats.warmup_seconds, 4),
            "loaded_from": stats.source,
            "context_length": loaded.context_length, "last_used": self.last_used,
            "in_flight": len(self.jobs), "waiting_for_kv": self.waiting, "requests_served": self.requests_served,
            "tokens_generated": self.tokens_generated, "prompt_cache": self.prefix.describe(),
            "kv_cache": describe_kv(self),
        }


class VariantRegistry:
    def __init__(self, catalog: ModelCatalog, default_dtype: str, budget_bytes: int, *,
                 trust_remote_code: bool = False, idle_unload_s: float | None = None,
                 prompt_cache_bytes: int = 0, kv_sequences: int = 16, kv_dtype: str = KV_FLOAT,
                 fit_order: tuple[str, ...] = DEFAULT_FIT_ORDER,
                 warm: Callable[[LoadedModel], None] | None = None) -> None:
        self.catalog = catalog
        self.default_dtype = normalize_dtype(default_dtype)
        self.budget_bytes = budget_bytes
        self.trust_remote_code = trust_remote_code
        self.idle_unload_s = idle_unload_s
        self.prompt_cache_bytes = prompt_cache_bytes  # per variant
        self.variants: dict[Key, Variant] = {}
        self.pinned: set[Key] = set()
        self.load_counts: dict[Key, int] = {}
        self.refused: dict[Key, str] = {}  # variants the non-finite policy refuses, with the reason
        self.failed_loads: dict[str, tuple[float, str]] = {}  # model -> (monotonic time, the load error)
        self.kv_sequences = kv_sequences  # sequences whose KV cache `fit` keeps room for
        self.kv_dtype = normalize_kv(kv_dtype)  # the KV precision of a variant whose name gives none
        self.fit_order = tuple(normalize_dtype(d) for d in fit_order)
        self.warm = warm  # compiles a variant loaded at run time for request shapes, before it serves
        self.fits: dict[str, dict] = {}  # model -> what `fit` chose and why
        self.loading: dict | None = None  # the load in progress: model, dtype, tensors and bytes done and in all
        self._specs: dict[tuple[str, str], VariantSpec] = {}
        # called after each tensor of a load: the engine decodes for the variants already serving
        self.between_tensors: Callable[[], None] | None = None
        # Distributed (models.distributed): the group each rank loads its shard of every variant for, and
        # what rank 0 tells the other ranks before it builds or drops a variant (they do the same).
        self.shard_group: Any = None
        self.mirror: Any = None  # has loading(key) and dropped(key)

    # ---- names -------------------------------------------------------------------------------
    def key(self, model: str, dtype: str | None) -> Key:
        """(model, the variant's canonical name: its weights' precision and, unless float, its KV
        precision, `q4+kv8`); `fit` is resolved once per model, a name without a KV precision takes the
        server's."""
        model = self.catalog.canonical(model)
        weights, kv = split_kv(normalize_dtype(dtype) if dtype else self.default_dtype)
        if weights == FIT:
            weights = self.fit(model)["chosen"]
        return model, variant_name(self.spec(model, weights).key, kv or self.kv_dtype)

    def spec(self, model: str, dtype: str) -> VariantSpec:
        """What a canonical precision name means for this model's checkpoint (headers read once)."""
        folder = self.catalog.resolve(model)
        if (model, dtype) not in self._specs:
            self._specs[(model, dtype)] = variant_spec(folder, dtype)
        return self._specs[(model, dtype)]

    def fit(self, model: str) -> dict:
        """The first precision of `fit_order` whose estimate plus the KV cache of `kv_sequences`
        sequences at the model's context fits the budget beside the variants that cannot be evicted."""
        if model in self.fits:
            return self.fits[model]
        folder = self.catalog.resolve(model)
        config = read_config(folder)
        context = context_length(config)
        held = sum(v.loaded.stats.final_bytes for k, v in self.variants.items() if k in self.pinned or v.busy)
        available = self.budget_bytes - held
        tried: list[dict] = []
        for name in self.fit_order:
            try:
                spec = self.spec(model, name)
            except PrecisionUnavailableError:  # e.g. another quantization of a quantized checkpoint
                continue
            if any(t["dtype"] == spec.key for t in tried):
                continue
            weights = self._required_bytes(folder, spec.key)
            reserve = kv_cache_bytes(config, spec.float_dtype, self.kv_sequences, context,
                                     kv_bits(self.kv_dtype)) // self.ranks  # split by heads
            tried.append({"dtype": spec.key, "weights_bytes": weights, "kv_reserve_bytes": reserve,
                          "fits": weights + reserve <= available})
            if tried[-1]["fits"]:
                break
        chosen = next((t for t in tried if t["fits"]), None)
        if chosen is None:
            need = min((t["weights_bytes"] + t["kv_reserve_bytes"] for t in tried), default=0)
            raise MemoryBudgetError(
                f"no precision of {', '.join(self.fit_order)} fits {model} in {available} bytes with room for "
                f"the KV cache of {self.kv_sequences} sequences of {context} tokens",
                required_bytes=need, available_bytes=available, dtype=FIT, retry=False)
        reason = (f"{chosen['dtype']}: {chosen['weights_bytes']} bytes of weights + {chosen['kv_reserve_bytes']} "
                  f"of KV cache ({self.kv_sequences} sequences x {context} tokens) fit {available} bytes")
        if len(tried) > 1:
            reason += f"; {', '.join(t['dtype'] for t in tried[:-1])} did not"
        report = {"chosen": chosen["dtype"], "reason": reason, "available_bytes": available,
                  "order": list(self.fit_order), "tried": tried}
        log.info("fit for %s: %s", model, reason)
        self.fits[model] = report
        return report

    def used_bytes(self) -> int:
        """Bytes the budget holds now: resident variants' weights, their prompt caches, and the live KV caches
        of their running sequences. Variants cast from a resident one share the arrays the cast leaves
        unchanged (e.g. quantized integer weights); those count once."""
        return self.weights_bytes() + self.prompt_cache_used() + self.kv_cache_live()

    def weights_bytes(self, variants: list[Variant] | None = None) -> int:
        """Bytes of the distinct arrays of `variants` (default: all resident)."""
        return unique_bytes(v.array_sizes() for v in (self.variants.values() if variants is None else variants))

    def prompt_cache_used(self) -> int:
        return sum(v.prefix.nbytes for v in self.variants.values())

    def kv_cache_live(self) -> int:
        """Bytes of the running sequences' KV caches, all variants."""
        return sum(live_kv_bytes(v) for v in self.variants.values())

    def kv_cache_reserved(self) -> int:
        """Bytes the running sequences' KV caches may still grow by (each to its prompt + max_tokens)."""
        return sum(reserved_bytes(v) for v in self.variants.values())

    def free_bytes(self) -> int:
        """What a new request or load may take: the budget less what is held and what is promised."""
        return self.budget_bytes - self.used_bytes() - self.kv_cache_reserved()

    def make_room_in_prompt_caches(self, required: int) -> None:
        """Cached prompts go first, before any variant, when `required` bytes do not fit."""
        if self.free_bytes() < required:
            for variant in self.variants.values():
                variant.prefix.clear()

    def evictable(self, keep: Variant | None = None) -> list[Variant]:
        """Idle, unpinned variants (never `keep`), least recently used first."""
        return sorted((v for k, v in self.variants.items() if not v.busy and k not in self.pinned and v is not keep),
                      key=lambda v: v.last_used)

    def floor_bytes(self, variant: Variant) -> int:
        """What stays held with nothing else running: `variant`'s weights and the pinned variants'."""
        kept = [v for k, v in self.variants.items() if k in self.pinned or v is variant]
        return self.weights_bytes(kept)

    def make_room(self, required: int, keep: Variant | None = None) -> bool:
        """Without touching a running request, free `required` bytes: the prompt caches first, then idle
        variants (never `keep`), least recently used first. Whether they are free now."""
        self.make_room_in_prompt_caches(required)
        for variant in self.evictable(keep):
            if self.free_bytes() >= required:
                break
            log.info("evicting %s/%s (least recently used) for KV room", *variant.key)
            self._drop(variant.key)
        return self.free_bytes() >= required

    # ---- loading -----------------------------------------------------------------------------
    def get(self, model: str, dtype: str | None) -> Variant:
        key = self.key(model, dtype)
        if key in self.refused:
            raise DtypeRefusedError(self.refused[key])
        variant = self.variants.get(key) or self._load(key)
        variant.last_used = time.time()
        return variant

    def _exact_source(self, model: str, dtype: str) -> Variant | None:
        """A resident variant that holds the checkpoint's values exactly."""
        if self.shard_group is not None:  # a shard's arrays are not the whole model's: always read the checkpoint
            return None
        own = self.spec(model, AUTO).key
        for candidate in (own, "float32"):
            variant = self._with_weights(model, candidate)
            if variant is not None and candidate != dtype and (candidate == own or own in ("bfloat16", "float16")):
                return variant
        return None

    def _with_weights(self, model: str, weights: str) -> Variant | None:
        """A resident variant of `model` whose weights are `weights` (at any KV precision)."""
        return next((v for (m, _), v in self.variants.items() if m == model and v.weights_dtype == weights), None)

    def _load(self, key: Key) -> Variant:
        """Load a variant; a checkpoint that failed is refused again for FAILED_LOAD_TTL_S, unread."""
        name = key[0]
        failed = self.failed_loads.get(name)
        if failed is not None:
            if time.monotonic() - failed[0] < FAILED_LOAD_TTL_S:
                raise ModelLoadError(failed[1])
            del self.failed_loads[name]
        try:
            return self._load_checkpoint(key)
        except ModelLoadError as e:
            self.failed_loads[name] = (time.monotonic(), str(e))
            raise

    def _load_checkpoint(self, key: Key) -> Variant:
        """Load a variant; one that differs from a resident one only in KV precision shares its weights."""
        name, dtype = key[0], split_kv(key[1])[0]
        sibling = self._with_weights(name, dtype)
        if sibling is not None:
            self._tell_mirror("loading", key)
            return self._register(key, dataclasses.replace(sibling.loaded, dtype=key[1]))
        spec = self.spec(name, dtype)
        if spec.quantize:
            check_runs(spec.quantization, spec.float_dtype)  # before anything is evicted or allocated
        folder = self.catalog.resolve(name)
        required = self._required_bytes(folder, dtype)
        floor = config_floor_bytes(read_config(folder)) // self.ranks
        if floor > self.budget_bytes:  # whatever the checkpoint holds, this model could never be built
            raise MemoryBudgetError(f"{name}'s config declares shapes of at least {floor} bytes, beyond the "
                                    f"{self.budget_bytes}-byte memory budget", required_bytes=floor,
                                    available_bytes=self.budget_bytes, dtype=dtype, retry=False)
        self._make_room(required, dtype)
        source = self._exact_source(name, dtype)
        self._tell_mirror("loading", key)
        progress = self._progress(key)
        try:
            if source is not None:
                loaded = derive_variant(source.loaded, dtype, self.trust_remote_code, progress)
            else:
                loaded = load_variant(name, self.catalog.resolve(name), dtype, self.trust_remote_code, progress,
                                      shard_group=self.shard_group)
            if self.warm is not None:
                started = time.perf_counter()
                self.warm(loaded)
                loaded.stats = dataclasses.replace(loaded.stats, warmup_seconds=time.perf_counter() - started)
        finally:
            self.loading = None
        stats = loaded.stats
        log.info("loaded %s/%s from %s: %d bytes (estimated %d), peak %.3fx final, %.2fs + %.2fs warm-up",
                 name, dtype, stats.source, stats.final_bytes, required, stats.peak_over_final,
                 stats.load_seconds, stats.warmup_seconds)
        return self._register(key, dataclasses.replace(loaded, dtype=key[1]))

    def _register(self, key: Key, loaded: LoadedModel) -> Variant:
        """The resident variant `key` of `loaded`'s weights, with its KV precision."""
        bits = kv_bits(split_kv(key[1])[1] or KV_FLOAT)
        kv = None if bits is None else (kv_group_size(loaded.config), bits)
        variant = Variant(loaded, PrefixCache(self.prompt_cache_bytes), kv=kv)
        self.variants[key] = variant
        self.load_counts[key] = self.load_counts.get(key, 0) + 1
        return variant

    def _progress(self, key: Key) -> Callable[[int, int, int, int], None]:
        """Records the load's progress for reports (`loading` in /memory's budget, /health, /models) and
        logs each quarter. Bytes are the variant's: built so far, and in all."""
        self.loading = {"model": key[0], "dtype": key[1], "tensors_done": 0, "tensors": 0, "bytes_done": 0,
                        "bytes": 0}
        log_quarters = log_progress(*key)

        def update(done: int, total: int, bytes_done: int, bytes_total: int) -> None:
            # one new dict per step: readers on other threads see a whole snapshot, never a half-updated one
            self.loading = {"model": key[0], "dtype": key[1], "tensors_done": done, "tensors": total,
                            "bytes_done": bytes_done, "bytes": bytes_total}
            log_quarters(done, total, bytes_done, bytes_total)
            if self.between_tensors is not None:
                self.between_tensors()

        return update

    def _make_room(self, required: int, dtype: str) -> None:
        """Evict idle, unpinned variants (least recently used first) until `required` fits."""
        self.make_room_in_prompt_caches(required)
        evictable = self.evictable()
        free_now = self.free_bytes()
        reclaimable = sum(v.loaded.stats.final_bytes for v in evictable)
        if required > free_now + reclaimable:
            # running requests free their KV caches (live and reserved) as they end, and their variants then
            busy = sum(v.loaded.stats.final_bytes for k, v in self.variants.items()
                       if v.busy and k not in self.pinned) + self.kv_cache_live() + self.kv_cache_reserved()
            fits_later = required <= free_now + reclaimable + busy
            raise MemoryBudgetError(
                f"the {dtype} variant needs {required} bytes but only {free_now + reclaimable} of the "
                f"{self.budget_bytes}-byte memory budget can be made free"
                + (" now; retry when running requests finish" if fits_later else ""),
                required_bytes=required, available_bytes=free_now + reclaimable, dtype=dtype,
                retry=fits_later)
        for variant in evictable:
            if self.free_bytes() >= required:
                break
            log.info("evicting %s/%s (least recently used)", *variant.key)
            self._drop(variant.key)

    # ---- unloading ---------------------------------------------------------------------------
    def unload(self, model: str, dtype: str) -> dict:
        key = self.key(model, dtype)
        variant = self.variants.get(key)
        if variant is None:
            raise InvalidRequestError(f"{model}/{key[1]} is not resident")
        if key in self.pinned:
            raise VariantPinnedError(f"{model}/{key[1]} is the pinned default variant and stays resident "
                                     "(start the server with --no-pin-default to allow unloading it)")
        if variant.busy:
            raise InvalidRequestError(f"{model}/{key[1]} is serving {len(variant.jobs)} request(s)"
                                      + (f" ({variant.waiting} more waiting)" if variant.waiting else ""))
        before = mx.get_active_memory()
        self._drop(key)
        return {"model": key[0], "dtype": key[1], "freed_bytes": before - mx.get_active_memory()}

    def unload_idle(self, now: float) -> None:
        if not self.idle_unload_s:
            return
        for key, variant in list(self.variants.items()):
            if not variant.busy and key not in self.pinned and now - variant.last_used > self.idle_unload_s:
                log.info("unloading %s/%s after %.0fs idle", *key, now - variant.last_used)
                self._drop(key)

    @property
    def ranks(self) -> int:
        """Ranks the model is split over (the budget is per rank)."""
        return self.shard_group.size() if self.shard_group is not None else 1

    def _required_bytes(self, folder: Any, dtype: str) -> int:
        """The estimated weight bytes of a variant on this rank (its shard, when distributed)."""
        estimate = estimate_variant(folder, dtype, self.ranks)
        return estimate.get("per_rank_bytes", estimate["total_bytes"])

    def _tell_mirror(self, event: str, key: Key) -> None:
        if self.mirror is not None:
            getattr(self.mirror, event)(key)

    def drop(self, key: Key) -> None:
        """Unload `key` now, whatever holds it (a follower rank, as rank 0 says)."""
        self._drop(key)

    def _drop(self, key: Key) -> None:
        self._tell_mirror("dropped", key)
        variant = self.variants.pop(key)
        variant.generator = None
        variant.loaded = None  # type: ignore[assignment]
        del variant
        gc.collect()
        mx.clear_cache()

    def refuse(self, key: Key, reason: str) -> None:
        """Refuse this variant from now on; unload it once no request uses it."""
        self.refused[key] = reason
        variant = self.variants.get(key)
        if variant is not None and not variant.busy and key not in self.pinned:
            self._drop(key)

    def report(self) -> dict:
        used, reserved = self.used_bytes(), self.kv_cache_reserved()
        return {"budget_bytes": self.budget_bytes, "used_bytes": used,
                "free_bytes": self.budget_bytes - used - reserved,
                "weights_bytes": self.weights_bytes(), "prompt_cache_bytes": self.prompt_cache_used(),
                "kv_cache_live_bytes": self.kv_cache_live(), "kv_cache_reserved_bytes": reserved,
                "waiting_for_kv": sum(v.waiting for v in self.variants.values()),
                "pinned": [{"model": m, "dtype": d} for m, d in sorted(self.pinned)],
                "loading": self.loading, "fit": self.fits,
                "loads": [{"model": m, "dtype": d, "count": n} for (m, d), n in sorted(self.load_counts.items())],
                "refused": [{"model": m, "dtype": d, "reason": r} for (m, d), r in sorted(self.refused.items())],
                "failed_loads": [{"model": m, "error": e} for m, (_, e) in sorted(self.failed_loads.items())]}
