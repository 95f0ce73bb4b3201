"""The dtype report as a job: fidelity and speed of each precision of a model against float32.

For every precision (float dtypes and quantizations): exact parameter bytes, bits per weight, load time
and peak, prefill and decode tokens/s at batch 1 and batched, and against the float32 variant over a probe
set the figures of models.report.compare; for the bundled model also the held-out task accuracy. The
decoding runs on the serving code (models.report.runs). A precision may name a KV cache precision
(`float32+kv8`, `q4+kv4`): its figures are then measured with that KV cache as served, and its `kv_cache`
entry adds the bytes per token and, at growing context, its fidelity against the same weights' float KV
cache (`kv_contexts`).

`FidelityJob.step()` does one model call (a load, a prefill, one decode step, one teacher-forced pass)
so the engine's single MLX worker thread can interleave it with requests. Everything runs on the calling
thread: call `step()` from one thread only. The command line is models.report.cli (`dtype-serve compare`).
"""

from __future__ import annotations

import gc
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.platform.blas import blas_choice, configure_blas

if __name__ == "__main__":  # `python -m models.report.fidelity` (the old entry): the BLAS before mlx
    configure_blas(blas_choice(sys.argv[1:]))

import mlx.core as mx  # noqa: E402

from models.decode.prefill import shapes_cost  # noqa: E402
from models.errors import EngineError, PrecisionUnavailableError  # noqa: E402
from models.platform.blas import blas_info  # noqa: E402
from models.report import runs  # noqa: E402
from models.report.compare import Tally, compare_logits, finite_or_none  # noqa: E402
from models.report.probes import probe_set, validate_prompts  # noqa: E402
from models.weights.catalog import default_model_ref  # noqa: E402
from models.weights.checkpoint import variant_spec  # noqa: E402
from models.weights.dtypes import (  # noqa: E402
    AUTO,
    FIT,
    KV_FLOAT,
    kv_bits,
    normalize_dtype,
    parse_precision,
    split_kv,
    variant_name,
)
from models.weights.estimate import kv_bytes_per_token, kv_group_size  # noqa: E402
from models.weights.loader import LoadedModel, load_variant, resolve_auto  # noqa: E402
from models.weights.memory import bits_per_weight, device_info  # noqa: E402
from models.weights.quantize import check_runs  # noqa: E402

REFERENCE = "float32"
_PART = runs.PART
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPES = FLOAT_DTYPES  # the report's set before it covered quantizations (see default_report_dtypes)
# Quantizations the default report covers where this device and the model can have them
REPORT_QUANTIZATIONS = ("q8", "q4", "mxfp8", "mxfp4", "nvfp4")
DEFAULT_TASK_PROMPTS = 100
DEFAULT_KV_CONTEXTS = (256, 1024, 4096)  # tokens of context before the positions a KV precision is scored at


def available(folder: Path, dtype: str) -> str | None:
    """None if `folder` can be loaded at precision `dtype` on this device; else why not."""
    try:
        spec = variant_spec(Path(folder), dtype)
        if spec.quantize:
            check_runs(spec.quantization, spec.float_dtype)
    except PrecisionUnavailableError as e:
        return str(e)
    return None


def default_report_dtypes(folder: str | Path) -> tuple[str, ...]:
    """The report's default precisions for a model: the float dtypes, and those of REPORT_QUANTIZATIONS
    that this device can run and the checkpoint can take (runs a tiny kernel per mode: MLX thread only)."""
    return FLOAT_DTYPES + tuple(q for q in REPORT_QUANTIZATIONS if available(Path(folder), q) is None)


@dataclass(frozen=True)
class Task:
    """Checkable prompts: (prompt, expected) items and a judge of a greedy completion's text."""

    name: str
    items: tuple[tuple[str, str], ...]
    is_correct: Callable[[str, str], bool]
    max_tokens: int = 8


def bundled_task(n: int = DEFAULT_TASK_PROMPTS) -> Task:
    """The bundled model's held-out additions ("17+25=" -> "42")."""
    from models.bundled import tasks

    return Task("tiny-arith held-out addition", tuple(tasks.heldout_prompts(n)), tasks.is_correct)


def is_bundled(folder: Path) -> bool:
    return Path(folder).resolve() == Path(default_model_ref()).resolve()


def failure_reason(error: BaseException) -> str:
    """What a client is told of a failed report: an engine error's own (safe) message; otherwise the
    error's type and message with host paths cut to their file names."""
    if isinstance(error, EngineError):
        return str(error)
    return f"{type(error).__name__}: " + re.sub(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)", r"\1", str(error))


class FidelityJob:
    """A dtype fidelity/speed report computed in small steps.

    `dtypes` are precision names (aliases and `auto` allowed, not `fit`); float32, the reference, is always
    measured; a precision this device or model cannot have raises PrecisionUnavailableError. `prompts` is
    the probe set (None: the bundled probe prompts). `task` is a `Task`, None, or "auto" (the held-out
    additions when `folder` is the bundled model). `speed_batch`: rows of the batched speed run;
    `pad_prefill`: prefill in bucket shapes as the engine does (None: where shapes cost, as its default).
    `kv_contexts`, `kv_positions`: a quantized KV precision is scored at `kv_positions` teacher-forced
    positions after each of these context lengths (one beyond the model's context at the longest it has).

    The job loads its own copies of the variants: the reference stays resident for the whole job, and
    one other variant at a time beside it.
    """

    def __init__(self, name: str, folder: str | Path, dtypes: Iterable[str] = DEFAULT_DTYPES,
                 prompts: Sequence[str] | None = None, task: Task | str | None = "auto", *,
                 greedy_tokens: int = 32, prefill_tokens: int = 128, decode_tokens: int = 32,
                 speed_repeats: int = 3, speed_batch: int = 8, task_batch: int = 32,
                 reference_cache_bytes: int = 256 * 2**20, pad_prefill: bool | None = None,
                 kv_contexts: Sequence[int] = DEFAULT_KV_CONTEXTS, kv_positions: int = 32,
                 trust_remote_code: bool = False, show_paths: bool = False) -> None:
        self.name = name
        self.show_paths = show_paths  # file paths in the result (the BLAS library); names only otherwise
        self.folder = Path(folder)
        requested = [REFERENCE]
        for d in dtypes:
            weights, kv = split_kv(normalize_dtype(d))
            d = variant_name(weights, kv or KV_FLOAT)  # `+float` is the plain name: the report's KV is float
            if weights == FIT:
                raise ValueError("the report measures named precisions, not fit (ask for the one fit chose)")
            if d not in requested:
                requested.append(d)
        self.dtypes = requested
        self.prompts = probe_set() if prompts is None else validate_prompts(prompts, source="probe prompts")
        if not self.prompts:
            raise ValueError("the probe set is empty")
        self._concrete = {d: self._concrete_name(d) for d in requested}
        self._order = list(dict.fromkeys(self._concrete.values()))  # unique concrete precisions, float32 first
        if task == "auto":
            task = bundled_task() if is_bundled(self.folder) else None
        elif task is not None and not isinstance(task, Task):
            raise ValueError(f"task must be a Task, None or 'auto', not {task!r}")
        self.task: Task | None = task
        for value, label in ((greedy_tokens, "greedy_tokens"), (prefill_tokens, "prefill_tokens"),
                             (decode_tokens, "decode_tokens"), (speed_repeats, "speed_repeats"),
                             (speed_batch, "speed_batch"), (task_batch, "task_batch"),
                             (kv_positions, "kv_positions"), *((c, "kv_contexts") for c in kv_contexts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer")
        self.greedy_tokens = greedy_tokens
        self.prefill_tokens = prefill_tokens
        self.decode_tokens = decode_tokens
        self.speed_repeats = speed_repeats
        self.speed_batch = speed_batch
        self.task_batch = task_batch
        self.kv_contexts = tuple(sorted(set(kv_contexts)))
        self.kv_positions = kv_positions
        self.reference_cache_bytes = reference_cache_bytes
        self.pad_prefill = shapes_cost() if pad_prefill is None else pad_prefill
        self.trust_remote_code = trust_remote_code

        self.progress = 0.0
        self.done = False
        self.error: str | None = None
        self.stage = "queued"
        self.result: dict | None = None
        self.warnings: list[str] = []

        self._ref: LoadedModel | None = None
        self._variant: LoadedModel | None = None
        self._ids: list[list[int]] = []  # prompt token ids
        self._seqs: list[list[int]] = []  # prompt + reference greedy continuation: the teacher-forced input
        self._ref_greedy: list[list[int]] = []
        self._ref_logits: dict[int, mx.array] = {}
        self._cached_bytes = 0
        self._task_chunks: list[list[tuple[list[int], str]]] = []
        self._speed_ids: list[int] = []
        self._kv_ids: list[int] = []  # the KV context runs' tokens: the probe text repeated
        self._context_length = 0
        self._entries: dict[str, dict] = {}
        self._units_done = 0
        self._units_total = 1
        self._plan_iter: Iterator[object] | None = None

    def _concrete_name(self, dtype: str) -> str:
        """The variant a requested name loads (`auto`: the checkpoint's dtype; `q4:bfloat16` is `q4` where
        bfloat16 is the default rest), with its KV precision; refuses what this device or checkpoint cannot
        have."""
        weights, kv = split_kv(dtype)
        return variant_name(self._concrete_weights(weights), kv or KV_FLOAT)

    def _concrete_weights(self, dtype: str) -> str:
        if dtype == AUTO:
            return resolve_auto(self.folder)
        if parse_precision(dtype).quantization is None:
            return dtype
        reason = available(self.folder, dtype)
        if reason is not None:
            raise PrecisionUnavailableError(reason)
        return variant_spec(self.folder, dtype).key

    # ---- driving ----------------------------------------------------------------------------
    def step(self) -> bool:
        """Do one step of work (one model call: a load, a prefill, a decode step, a teacher-forced pass);
        True once the job is done (then `result` is set)."""
        if self.error is not None:
            raise RuntimeError(f"the fidelity job failed: {self.error}")
        if self.done:
            return True
        if self._plan_iter is None:
            self._plan_iter = self._plan()
        try:
            part = next(self._plan_iter) is _PART
        except StopIteration:
            part = False
        except Exception as e:
            self.error = failure_reason(e)
            self.stage = "failed"
            self._plan_iter = None
            self._free()
            raise
        if part:
            return False
        self._units_done += 1
        self.progress = min(self._units_done / self._units_total, 1.0) if not self.done else 1.0
        return self.done

    def run(self, on_progress: Callable[[FidelityJob], None] | None = None) -> dict:
        while not self.step():
            if on_progress:
                on_progress(self)
        assert self.result is not None
        return self.result

    def status(self) -> dict:
        """JSON-ready progress; `stage` names the unit last worked on."""
        return {"model": self.name, "stage": self.stage, "progress": round(self.progress, 4),
                "done": self.done, "error": self.error}

    def close(self) -> None:
        """Stop the job and free its variants (a server cancelling a job calls this, on the worker thread)."""
        if self._plan_iter is not None:
            self._plan_iter.close()
            self._plan_iter = None
        if not self.done and self.error is None:
            self.error = "cancelled"
            self.stage = "cancelled"
        self._free()

    def _free(self) -> None:
        self._variant = None
        self._ref = None
        self._ref_logits.clear()
        self._cached_bytes = 0
        gc.collect()
        mx.clear_cache()

    # ---- the plan: a generator of units, each cut into parts of one model call ----------------
    def _plan(self) -> Iterator[object]:
        n_prompts = len(self.prompts)
        self._units_total = self._count_units()
        self.stage = f"loading {REFERENCE}"
        self._ref = self._load(REFERENCE)
        yield
        self._prepare_inputs(self._ref)
        self._units_total = self._count_units()  # exact now that the task prompts are tokenized
        self.stage = f"measuring speed of {REFERENCE}"
        ref_speed = yield from self._speed(self._ref)
        yield
        for i in range(n_prompts):
            self.stage = f"reference prompt {i + 1}/{n_prompts}"
            yield from self._prepare_reference(i)
            yield

        for dtype in self._order:
            if dtype == REFERENCE:
                variant, speed = self._ref, ref_speed
            else:
                self.stage = f"loading {dtype}"
                self._variant = variant = self._load(dtype)
                yield
                self.stage = f"measuring speed of {dtype}"
                speed = yield from self._speed(variant, self._kv(dtype, variant))
                yield
            tally = Tally()
            per_prompt: list[dict] = []
            for i in range(n_prompts):
                self.stage = f"{dtype}: prompt {i + 1}/{n_prompts}"
                per_prompt.append((yield from self._compare(variant, i, tally, self._kv(dtype, variant))))
                yield
            for j, chunk in enumerate(self._task_chunks):
                self.stage = f"{dtype}: task batch {j + 1}/{len(self._task_chunks)}"
                yield from self._task_batch(variant, chunk, tally, self._kv(dtype, variant))
                yield
            contexts = []
            for context in self._kv_contexts_of(dtype):
                self.stage = f"{dtype}: KV cache at {context} tokens of context"
                contexts.append((yield from self._kv_context(variant, context, self._kv(dtype, variant))))
                yield
            self._entries[dtype] = self._entry(dtype, variant, speed, tally, per_prompt)
            self._entries[dtype]["kv_cache"] = self._kv_entry(dtype, variant, contexts)
            if dtype != REFERENCE:
                self._variant = variant = None
                gc.collect()
                mx.clear_cache()

        variant = speed = ref_speed = None
        self.stage = "summary"
        self._free()
        self.result = self._summary()
        self.stage = "done"
        self.done = True
        yield

    def _count_units(self) -> int:
        """Reference load, speed and one unit per prompt; per other dtype a load and a speed unit; per
        dtype one unit per prompt and per task batch; the summary."""
        if self.task is None:
            chunks = 0
        elif self._task_chunks:
            chunks = len(self._task_chunks)
        else:  # before tokenizing: a lower bound
            chunks = math.ceil(len(self.task.items) / self.task_batch)
        n = len(self.prompts)
        return 2 + n + sum(n + chunks + len(self._kv_contexts_of(d)) + (0 if d == REFERENCE else 2)
                           for d in self._order) + 1

    # ---- units ------------------------------------------------------------------------------
    def _load(self, dtype: str) -> LoadedModel:
        """The variant's weights: the reference's own where they are float32 (`float32+kv8`), else loaded."""
        weights = split_kv(dtype)[0]
        if weights == REFERENCE and self._ref is not None:
            return self._ref
        loaded = load_variant(self.name, self.folder, weights, trust_remote_code=self.trust_remote_code)
        gc.collect()
        return loaded

    @staticmethod
    def _kv(dtype: str, loaded: LoadedModel) -> tuple[int, int] | None:
        """(group size, bits) of the variant's quantized KV cache; None for the float one."""
        bits = kv_bits(split_kv(dtype)[1] or KV_FLOAT)
        return None if bits is None else (kv_group_size(loaded.config), bits)

    def _kv_contexts_of(self, dtype: str) -> tuple[int, ...]:
        """The context lengths a precision's KV cache is scored at, for a quantized KV precision only: those
        asked, a length beyond the model's context (less `kv_positions`) scored at that limit instead."""
        if kv_bits(split_kv(dtype)[1] or KV_FLOAT) is None:
            return ()
        limit = self._kv_limit()
        return tuple(sorted({c if limit is None else min(c, limit) for c in self.kv_contexts}))

    def _kv_limit(self) -> int | None:
        """The longest context the KV runs can have (None before the model's context is known)."""
        return max(self._context_length - self.kv_positions, 1) if self._context_length else None

    @staticmethod
    def _encode(tokenizer: Any, text: str) -> list[int]:
        return list(tokenizer.encode(text))

    def _prepare_inputs(self, ref: LoadedModel) -> None:
        tok = ref.tokenizer
        ctx = ref.context_length or 4096
        budget = max(ctx - self.greedy_tokens - 1, 1)
        for n, prompt in enumerate(self.prompts, start=1):
            ids = self._encode(tok, prompt)
            if not ids:
                raise ValueError(f"probe prompt {n} encodes to no tokens")
            if len(ids) > budget:
                self.warnings.append(f"probe prompt {n} has {len(ids)} tokens; truncated to {budget} "
                                     f"to fit the context of {ctx} with {self.greedy_tokens} generated tokens")
                ids = ids[:budget]
            self._ids.append(ids)
        # speed prompt: the probe text repeated to prefill_tokens tokens (bounded by the context)
        self._speed_ids = self._repeated(tok, max(min(self.prefill_tokens, ctx - self.decode_tokens - 4), 1))
        self._context_length = ctx
        longest = max((c for d in self._order for c in self._kv_contexts_of(d)), default=0)
        if longest:
            self._kv_ids = self._repeated(tok, longest + self.kv_positions)
        # task prompts grouped by token length, so each batch decodes without padding
        if self.task is not None:
            groups: dict[int, list[tuple[list[int], str]]] = {}
            for prompt, expected in self.task.items:
                ids = self._encode(tok, prompt)
                groups.setdefault(len(ids), []).append((ids, expected))
            self._task_chunks = [group[k:k + self.task_batch] for _, group in sorted(groups.items())
                                 for k in range(0, len(group), self.task_batch)]

    def _repeated(self, tok: Any, length: int) -> list[int]:
        """The probe text repeated to `length` tokens."""
        ids: list[int] = []
        while len(ids) < length:  # prompt by prompt: encoding a text beyond the context makes tokenizers warn
            before = len(ids)
            for prompt in self.prompts:
                ids += self._encode(tok, prompt + " ")
                if len(ids) >= length:
                    break
            if len(ids) == before:
                ids = [0]
        return ids[:length]

    @staticmethod
    def _eos(loaded: LoadedModel) -> set[int]:
        return set(getattr(loaded.tokenizer, "eos_token_ids", None) or ())

    def _greedy(self, loaded: LoadedModel, ids: list[int], kv: tuple[int, int] | None = None) -> Iterator[object]:
        return runs.greedy(loaded.model, ids, self.greedy_tokens, self._eos(loaded), self.pad_prefill, kv)

    def _prepare_reference(self, i: int) -> Iterator[object]:
        assert self._ref is not None
        ids = self._ids[i]
        greedy = yield from self._greedy(self._ref, ids)
        self._ref_greedy.append(greedy)
        eos = self._eos(self._ref)
        continuation = greedy[:-1] if greedy and greedy[-1] in eos else greedy
        seq = ids + continuation
        self._seqs.append(seq)
        logits = runs.teacher_forced_logits(self._ref.model, seq)
        if self._cached_bytes + logits.nbytes <= self.reference_cache_bytes:
            self._ref_logits[i] = logits
            self._cached_bytes += logits.nbytes

    def _compare(self, variant: LoadedModel, i: int, tally: Tally, kv: tuple[int, int] | None = None
                 ) -> Iterator[object]:
        """The comparison of prompt `i` (the return value), counted into `tally`; with `kv`, the variant's
        logits and greedy tokens come through that quantized KV cache."""
        assert self._ref is not None
        seq = self._seqs[i]
        ref = self._ref_logits.get(i)
        if ref is None:
            ref = runs.teacher_forced_logits(self._ref.model, seq)
            yield _PART
        comparison = compare_logits(ref, runs.teacher_forced_logits(variant.model, seq, kv, len(self._ids[i])))
        yield _PART
        greedy = yield from self._greedy(variant, self._ids[i], kv)
        return tally.add_prompt(comparison, greedy, self._ref_greedy[i])

    def _task_batch(self, variant: LoadedModel, chunk: list[tuple[list[int], str]],
                    tally: Tally, kv: tuple[int, int] | None = None) -> Iterator[object]:
        assert self.task is not None
        rows = yield from runs.batch_greedy(variant.model, [ids for ids, _ in chunk], self.task.max_tokens,
                                            self._eos(variant), kv=kv)
        for (_, expected), row in zip(chunk, rows, strict=True):
            text = variant.tokenizer.decode(row) if row else ""
            tally.task_ok += bool(self.task.is_correct(expected, text))
            tally.task_n += 1

    def _kv_context(self, variant: LoadedModel, context: int, kv: tuple[int, int] | None) -> Iterator[object]:
        """The quantized KV cache against the float one of the same weights, at `kv_positions` positions
        after `context` tokens (the return value: the figures)."""
        ids = self._kv_ids[:context + self.kv_positions]
        ref = yield from runs.context_logits(variant.model, ids, context, None)
        yield _PART
        out = yield from runs.context_logits(variant.model, ids, context, kv)
        c = compare_logits(ref, out)
        return {"context": context, "positions": c.positions, "top1_agreement": c.agree / c.positions,
                "kl_mean": finite_or_none(sum(c.kls) / len(c.kls)) if c.kls else None,
                "kl_max": finite_or_none(max(c.kls)) if c.kls else None,
                "max_abs_logit_diff": finite_or_none(max(c.diffs)) if c.diffs else None}

    def _kv_entry(self, dtype: str, loaded: LoadedModel, contexts: list[dict]) -> dict:
        """An entry's `kv_cache`: its precision, bytes per token against the float cache's, and its fidelity
        at growing context (quantized precisions only; lengths beyond the model's context skipped)."""
        kv = split_kv(dtype)[1] or KV_FLOAT
        group, bits = self._kv(dtype, loaded) or (None, None)
        per_token = kv_bytes_per_token(loaded.config, loaded.float_dtype, bits)
        float_per_token = kv_bytes_per_token(loaded.config, loaded.float_dtype)
        limit = self._kv_limit()
        return {"dtype": kv, "bits": bits, "group_size": group, "bytes_per_token": per_token,
                "float_bytes_per_token": float_per_token, "bytes_ratio": round(per_token / float_per_token, 4),
                "reference": variant_name(split_kv(dtype)[0], KV_FLOAT), "positions": self.kv_positions,
                "contexts": contexts,
                "beyond_model_context": [c for c in self.kv_contexts if limit is not None and c > limit] if bits
                else []}

    def _speed(self, loaded: LoadedModel, kv: tuple[int, int] | None = None) -> Iterator[object]:
        """Batch-1 prefill and decode (each after one warm-up run) and batched decode (windows of one
        batch after warm-up steps), on the serving paths at KV precision `kv`; medians of the repeats (the
        return value)."""
        model = loaded.model

        def single() -> Iterator[object]:
            return runs.single_speed(model, self._speed_ids, self.decode_tokens, self.pad_prefill, kv)

        ones = []
        yield from single()
        for _ in range(self.speed_repeats):
            ones.append((yield from single()))
        # one batch prefilled once, its repeats windows of steps after two warm-up steps (the shapes)
        many = yield from runs.batch_speed(model, self._speed_ids, self.speed_batch, self.decode_tokens,
                                           windows=self.speed_repeats, kv=kv)
        prefill = statistics.median(r.prefill_s for r in ones)
        decode = statistics.median(r.decode_s for r in ones)
        batch_rate = statistics.median(r.decode_tokens / r.decode_s for r in many if r.decode_s > 0) \
            if any(r.decode_s > 0 for r in many) else None
        return {"prefill_tok_s": round(len(self._speed_ids) / prefill, 1) if prefill > 0 else None,
                "decode_tok_s": round(self.decode_tokens / decode, 1) if decode > 0 else None,
                "decode_batch_tok_s": round(batch_rate, 1) if batch_rate else None}

    # ---- results ----------------------------------------------------------------------------
    def _entry(self, dtype: str, loaded: LoadedModel, speed: dict, tally: Tally, per_prompt: list[dict]) -> dict:
        stats = loaded.stats
        share = tally.nonfinite_share
        if tally.nonfinite:
            self.warnings.append(f"{dtype}: {share:.4%} of logits are non-finite (inf/nan) "
                                 f"({tally.nonfinite} of {tally.logits}); its KL and logit differences "
                                 f"cover the {tally.finite_positions} of {tally.positions} positions that are finite")
        quantization = loaded.quantization
        figures = tally.figures()
        return {
            "dtype": dtype,
            "float_dtype": loaded.float_dtype or dtype,
            "quantization": None if quantization is None else {
                "mode": quantization.mode, "bits": quantization.bits, "group_size": quantization.group_size},
            "bytes_by_dtype": dict(stats.bytes_by_dtype),
            "total_bytes": stats.final_bytes,
            "parameter_count": stats.parameter_count,
            "bits_per_weight": bits_per_weight(stats.final_bytes, stats.parameter_count),
            "load_seconds": round(stats.load_seconds, 4),
            "load_peak_bytes": stats.peak_bytes,
            **speed,
            **{k: figures[k] for k in ("positions", "top1_agreement", "kl_mean", "kl_max", "max_abs_logit_diff",
                                       "mean_greedy_agreement_tokens", "nonfinite_share", "task_accuracy")},
            "per_prompt": [{k: _finite(v) for k, v in p.items()} for p in per_prompt],
        }

    def _summary(self) -> dict:
        dtypes = {}
        for requested in self.dtypes:
            concrete = self._concrete[requested]
            entry = dict(self._entries[concrete])
            if requested != concrete:
                entry["alias_of"] = concrete  # `auto` is the checkpoint's dtype: the same variant
            entry["kv_cache"] = {**entry["kv_cache"], **self._kv_speed(entry)}
            dtypes[requested] = entry
        task = None
        if self.task is not None:
            task = {"name": self.task.name, "prompts": len(self.task.items), "max_tokens": self.task.max_tokens}
        return {
            "model": self.name,
            "reference": REFERENCE,
            "probe_prompts": len(self.prompts),
            "greedy_tokens": self.greedy_tokens,
            "speed": {"prefill_tokens": len(self._speed_ids), "decode_tokens": self.decode_tokens,
                      "repeats": self.speed_repeats, "batch": self.speed_batch,
                      "method": "the serving decode paths: a lone request's (prefill to its first token, then "
                      "greedy decode steps) and the batch's (decode steps of `batch` requests of the same "
                      "prompt); each step timed on its own; median of the repeats after one warm-up"},
            "task": task,
            "device": device_info(),
            "blas": blas_info().as_dict(paths=self.show_paths),
            "dtypes": dtypes,
            "warnings": list(self.warnings),
        }


    def _kv_speed(self, entry: dict) -> dict:
        """A quantized KV precision's decode speed against the float KV cache of the same weights, where the
        report measured those (e.g. `float32+kv8` against `float32`); None otherwise."""
        sibling = self._entries.get(entry["kv_cache"]["reference"]) if entry["kv_cache"]["bits"] else None

        def ratio(key: str) -> float | None:
            if sibling is None or not entry.get(key) or not sibling.get(key):
                return None
            return round(entry[key] / sibling[key], 4)

        return {"decode_tok_s_ratio": ratio("decode_tok_s"), "decode_batch_tok_s_ratio": ratio("decode_batch_tok_s")}


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def run_report(folder: str | Path, dtypes: Iterable[str] = DEFAULT_DTYPES, prompts: Sequence[str] | None = None,
               task: Task | str | None = "auto", *, name: str | None = None,
               on_progress: Callable[[FidelityJob], None] | None = None, **options: Any) -> dict:
    """Run a whole `FidelityJob` on this thread and return its result."""
    job = FidelityJob(name or Path(folder).resolve().name, folder, dtypes, prompts, task, **options)
    return job.run(on_progress)


if __name__ == "__main__":
    from models.report.cli import main

    sys.exit(main())
