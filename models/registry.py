"""Resident variants (model, dtype) under a byte budget, least recently used evicted first.

Runs on the engine's worker thread only, so it needs no locks: a load in progress blocks the
worker, and concurrent requests for the same variant find it resident when their turn comes.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from models.catalog import ModelCatalog
from models.checkpoint import read_config
from models.dtypes import AUTO, normalize_dtype
from models.errors import (
    DtypeRefusedError,
    InvalidRequestError,
    MemoryBudgetError,
    ModelLoadError,
    VariantPinnedError,
)
from models.estimate import config_floor_bytes, estimate_variant
from models.loader import LoadedModel, derive_variant, load_variant, resolve_auto
from models.memory import floating_dtypes, unique_bytes
from models.prefix_cache import PrefixCache

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
    single: Any = None  # SingleStream: the one request, while it is alone
    joining: set[int] = field(default_factory=set)  # batch uids still in prefill while `single` decodes
    jobs: dict[int, Any] = field(default_factory=dict)
    last_used: float = field(default_factory=time.time)
    requests_served: int = 0
    tokens_generated: int = 0

    @property
    def key(self) -> Key:
        return (self.loaded.name, self.loaded.dtype)

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    def describe(self) -> dict:
        loaded, stats = self.loaded, self.loaded.stats
        return {
            "model": loaded.name, "dtype": loaded.dtype,
            "floating_dtypes": sorted(floating_dtypes(loaded.model)),
            "bytes_by_dtype": stats.bytes_by_dtype, "total_bytes": stats.final_bytes,
            "parameter_count": stats.parameter_count, "load_peak_bytes": stats.peak_bytes,
            "final_over_peak": round(stats.final_bytes / stats.peak_bytes, 4) if stats.peak_bytes else None,
            "load_seconds": round(stats.load_seconds, 4), "loaded_from": stats.source,
            "context_length": loaded.context_length, "last_used": self.last_used,
            "in_flight": len(self.jobs), "requests_served": self.requests_served,
            "tokens_generated": self.tokens_generated, "prompt_cache": self.prefix.describe(),
        }


class VariantRegistry:
    def __init__(self, catalog: ModelCatalog, default_dtype: str, budget_bytes: int, *,
                 trust_remote_code: bool = False, idle_unload_s: float | None = None,
                 prompt_cache_bytes: int = 0) -> None:
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
        self._auto: dict[str, str] = {}

    # ---- names -------------------------------------------------------------------------------
    def key(self, model: str, dtype: str | None) -> Key:
        model = self.catalog.canonical(model)
        folder = self.catalog.resolve(model)
        dtype = normalize_dtype(dtype) if dtype else self.default_dtype
        if dtype == AUTO:
            if model not in self._auto:
                self._auto[model] = resolve_auto(folder)
            dtype = self._auto[model]
        return model, dtype

    def used_bytes(self) -> int:
        """Bytes held by resident variants. Variants cast from a resident one share the arrays the
        cast leaves unchanged (e.g. quantized integer weights); those count once."""
        return unique_bytes(v.loaded.model for v in self.variants.values()) + self.prompt_cache_used()

    def prompt_cache_used(self) -> int:
        return sum(v.prefix.nbytes for v in self.variants.values())

    def make_room_in_prompt_caches(self, required: int) -> None:
        """Cached prompts go first, before any variant, when `required` bytes do not fit."""
        if self.budget_bytes - self.used_bytes() < required:
            for variant in self.variants.values():
                variant.prefix.clear()

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
        own = self.key(model, AUTO)[1]
        for candidate in (own, "float32"):
            variant = self.variants.get((model, candidate))
            if variant is not None and candidate != dtype and (candidate == own or own in ("bfloat16", "float16")):
                return variant
        return None

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
        name, dtype = key
        folder = self.catalog.resolve(name)
        required = estimate_variant(folder, dtype)["total_bytes"]
        floor = config_floor_bytes(read_config(folder))
        if floor > self.budget_bytes:  # whatever the checkpoint holds, this model could never be built
            raise MemoryBudgetError(f"{name}'s config declares shapes of at least {floor} bytes, beyond the "
                                    f"{self.budget_bytes}-byte memory budget", required_bytes=floor,
                                    available_bytes=self.budget_bytes, dtype=dtype, retry=False)
        self._make_room(required, dtype)
        source = self._exact_source(name, dtype)
        if source is not None:
            loaded = derive_variant(source.loaded, dtype, self.trust_remote_code)
        else:
            loaded = load_variant(name, self.catalog.resolve(name), dtype, self.trust_remote_code)
        variant = Variant(loaded, PrefixCache(self.prompt_cache_bytes))
        self.variants[key] = variant
        self.load_counts[key] = self.load_counts.get(key, 0) + 1
        stats = loaded.stats
        log.info("loaded %s/%s from %s: %d bytes (estimated %d), peak %.3fx final, %.2fs", name, dtype,
                 stats.source, stats.final_bytes, required, stats.peak_over_final, stats.load_seconds)
        return variant

    def _make_room(self, required: int, dtype: str) -> None:
        """Evict idle, unpinned variants (least recently used first) until `required` fits."""
        self.make_room_in_prompt_caches(required)
        evictable = sorted((v for k, v in self.variants.items() if not v.busy and k not in self.pinned),
                           key=lambda v: v.last_used)
        free_now = self.budget_bytes - self.used_bytes()
        reclaimable = sum(v.loaded.stats.final_bytes for v in evictable)
        if required > free_now + reclaimable:
            busy = sum(v.loaded.stats.final_bytes for k, v in self.variants.items()
                       if v.busy and k not in self.pinned)
            fits_later = required <= free_now + reclaimable + busy
            raise MemoryBudgetError(
                f"the {dtype} variant needs {required} bytes but only {free_now + reclaimable} of the "
                f"{self.budget_bytes}-byte memory budget can be made free"
                + (" now; retry when running requests finish" if fits_later else ""),
                required_bytes=required, available_bytes=free_now + reclaimable, dtype=dtype,
                retry=fits_later)
        for variant in evictable:
            if self.budget_bytes - self.used_bytes() >= required:
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
            raise InvalidRequestError(f"{model}/{key[1]} is serving {len(variant.jobs)} request(s)")
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

    def _drop(self, key: Key) -> None:
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
        used = self.used_bytes()
        return {"budget_bytes": self.budget_bytes, "used_bytes": used, "free_bytes": self.budget_bytes - used,
                "prompt_cache_bytes": self.prompt_cache_used(),
                "pinned": [{"model": m, "dtype": d} for m, d in sorted(self.pinned)],
                "loads": [{"model": m, "dtype": d, "count": n} for (m, d), n in sorted(self.load_counts.items())],
                "refused": [{"model": m, "dtype": d, "reason": r} for (m, d), r in sorted(self.refused.items())],
                "failed_loads": [{"model": m, "error": e} for m, (_, e) in sorted(self.failed_loads.items())]}
