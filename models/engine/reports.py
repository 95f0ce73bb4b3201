"""Hosting of the dtype fidelity reports on the worker: started on request, cached, stepped between decode steps."""

from __future__ import annotations

import hashlib
import logging
import time

from models.engine.config import EngineConfig
from models.engine.nonfinite import NonFinitePolicy
from models.errors import InvalidRequestError, MemoryBudgetError, QueueFullError
from models.report.fidelity import DEFAULT_KV_CONTEXTS, FidelityJob, default_report_dtypes
from models.weights.catalog import ModelCatalog
from models.weights.checkpoint import read_config
from models.weights.dtypes import KV_FLOAT, kv_bits, normalize_dtype, split_kv
from models.weights.estimate import estimate_variant, kv_cache_bytes
from models.weights.loader import context_length
from models.weights.registry import VariantRegistry

log = logging.getLogger(__name__)
MAX_REPORTS = 8  # reports kept (the newest)


def _kv_runs_bytes(folder, contexts: tuple[int, ...]) -> int:
    """What a KV precision's runs hold beside the weights: the float and the quantized cache of the longest
    scored context (capped at the model's), counted both in float32 as an upper bound."""
    if not contexts:
        return 0
    config = read_config(folder)
    return 2 * kv_cache_bytes(config, "float32", 1, min(max(contexts), context_length(config)))


class ReportHost:
    """The reports of this engine, per (model, dtypes, prompts, scope). Every method runs on the worker."""

    def __init__(self, catalog: ModelCatalog, registry: VariantRegistry, config: EngineConfig,
                 policy: NonFinitePolicy) -> None:
        self.catalog = catalog
        self.registry = registry
        self.config = config
        self.policy = policy
        self.jobs: dict[tuple, FidelityJob] = {}
        self._starts: list[float] = []  # when reports were started, within the last window

    def get(self, model: str | None, dtypes: tuple[str, ...] | None, prompts: tuple[str, ...] | None,
            retry: bool = False, scope: str = "", kv_contexts: tuple[int, ...] | None = None) -> FidelityJob:
        """The report of a model, started if new (or failed and `retry`). Reports over given prompts are
        kept per `scope` (a tenant), so no one learns which prompts others sent. `kv_contexts`: the context
        lengths a quantized KV precision is scored at (None: DEFAULT_KV_CONTEXTS; the caller bounds them)."""
        name = self.catalog.canonical(model or self.config.default_model)
        folder = self.catalog.resolve(name)
        wanted = tuple(sorted({normalize_dtype(d) for d in (dtypes or default_report_dtypes(folder))}))
        contexts = tuple(sorted(set(kv_contexts or DEFAULT_KV_CONTEXTS)))
        # the contexts only change a report with a quantized KV precision: others are one report whatever asked
        scored = contexts if any(kv_bits(split_kv(d)[1] or KV_FLOAT) for d in wanted) else ()
        key = (name, wanted, hashlib.sha256("\n".join(prompts or ()).encode()).hexdigest(), scope if prompts else "",
               scored)
        job = self.jobs.get(key)
        if job is not None and not (retry and job.error is not None):
            return job
        self._check_start()
        # Its own float32 copy plus one other variant at a time must fit beside what is resident.
        sizes = [estimate_variant(folder, split_kv(d)[0])["total_bytes"] for d in {"float32", *wanted}]
        need = estimate_variant(folder, "float32")["total_bytes"] + max(sizes) + _kv_runs_bytes(folder, scored)
        self.registry.make_room_in_prompt_caches(need)
        free = self.registry.free_bytes()
        if need > free:
            raise MemoryBudgetError(f"the report needs {need} bytes beside the resident variants; {free} are free",
                                    required_bytes=need, available_bytes=free, dtype="float32", retry=False)
        try:
            job = FidelityJob(name, folder, wanted, list(prompts) if prompts else None, kv_contexts=contexts,
                              trust_remote_code=self.registry.trust_remote_code, show_paths=self.config.show_paths)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        while len(self.jobs) >= MAX_REPORTS:  # keep the newest reports only
            self.jobs.pop(next(iter(self.jobs))).close()
        self.jobs[key] = job
        self._starts.append(time.monotonic())
        return job

    def _check_start(self) -> None:
        """Refuse a new report (429) once report_starts_per_hour have started within the last window."""
        limit, window = self.config.report_starts_per_hour, self.config.report_start_window_s
        if limit is None:
            return
        now = time.monotonic()
        self._starts = [t for t in self._starts if now - t < window]
        if len(self._starts) >= limit:
            wait = window - (now - self._starts[0]) if self._starts else None
            raise QueueFullError(f"the server starts at most {limit} new dtype reports "
                                 "an hour" + (f"; the next may start in {wait:.0f} s" if wait else "")
                                 + " (reports already computed are still served)")

    def running(self) -> FidelityJob | None:
        return next((j for j in self.jobs.values() if not j.done and j.error is None), None)

    def step(self, serving: bool) -> None:
        """Advance the running report: one step while requests decode (`serving`), else for up to
        report_slice_s. A finished report's non-finite dtypes are refused under the `refuse` policy."""
        job = self.running()
        if job is None:
            return
        deadline = time.perf_counter() + (0.0 if serving else self.config.report_slice_s)
        try:
            done = job.step()
            while not done and time.perf_counter() < deadline:
                done = job.step()
            if done:
                for dtype, reason in self.policy.refused_by_report(job.name, job.result).items():
                    self.registry.refuse((job.name, dtype), reason)
        except Exception:
            log.exception("fidelity report of %s failed", job.name)

    @staticmethod
    def status(job: FidelityJob) -> dict:
        """A report as /v1/dtypes/report shows it: its progress and state, with the result when done."""
        state = "failed" if job.error else "done" if job.done else "running"
        report = {**job.status(), "state": state, "dtypes": job.dtypes}
        if job.done:
            report["result"] = job.result
        return report
