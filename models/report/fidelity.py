"""Fidelity and speed of each dtype of a model against float32.

For every dtype: exact parameter bytes and load time, prefill and decode tokens/s, and against the
float32 variant over a probe set: top-1 agreement of the next-token argmax at every teacher-forced
position, KL(p_float32 || p_dtype) per position (mean and max), the largest |logit difference|, the
mean length of greedy agreement, and the share of non-finite logits; for the bundled model also the
held-out task accuracy.

`FidelityJob.step()` does one small unit of work (one load, one speed measurement, one prompt for
one dtype, one batch of task prompts) so the engine's single MLX worker thread can interleave it
with requests. Everything runs on the calling thread: call `step()` from one thread only.

    python -m models.report.fidelity [--model PATH] [--dtypes float32 bfloat16 float16] [--prompts FILE]
                              [--out report.json] [--chart chart.png]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.platform.blas import blas_choice, blas_info, configure_blas

if __name__ == "__main__":  # `python -m models.report.fidelity`: the BLAS must be chosen before mlx is imported
    configure_blas(blas_choice(sys.argv[1:]))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from models.errors import EngineError  # noqa: E402
from models.report.probes import probe_set, validate_prompts  # noqa: E402
from models.weights.catalog import default_model_ref  # noqa: E402
from models.weights.dtypes import AUTO, normalize_dtype  # noqa: E402
from models.weights.loader import LoadedModel, load_variant, resolve_auto  # noqa: E402
from models.weights.memory import device_info  # noqa: E402

REFERENCE = "float32"
# Yielded inside a unit of work: the worker may serve requests here, but the unit is not done. Units are
# cut at every model call of a decode loop, so that no step holds the MLX worker for long.
_PART = object()
DEFAULT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TASK_PROMPTS = 100


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


@dataclass
class _Tally:
    """Running sums of one dtype's comparison with the reference."""

    positions: int = 0
    agree: int = 0
    finite_positions: int = 0
    kl_sum: float = 0.0
    kl_max: float | None = None
    max_diff: float | None = None
    logits: int = 0
    nonfinite: int = 0
    greedy_total: int = 0
    prompts: int = 0
    task_ok: int = 0
    task_n: int = 0


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def kl_divergence(ref: mx.array, out: mx.array) -> mx.array:
    """KL(softmax(ref) || softmax(out)) over the last axis, accurate for tiny divergences in float32.

    With d = ref - out: KL = E_p[d] + log E_p[exp(-d)]. The textbook sum p * (log p - log q) loses
    about |log p| * 6e-8 to rounding (~1e-6 for a typical vocabulary), as much as the KL of a 16-bit
    dtype; written with expm1/log1p the two terms cancel exactly instead. Rows where some |d| >= 8
    use the textbook form (no overflow, and their KL is far above its rounding). Clamped at 0.
    """
    ref_lp = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    p = mx.exp(ref_lp)
    d = ref - out
    near = mx.max(mx.abs(d), axis=-1) < 8.0
    d_small = mx.where(near[..., None], d, 0.0)
    small = mx.sum(p * d_small, axis=-1) + mx.log1p(mx.sum(p * mx.expm1(-d_small), axis=-1))
    out_lp = out - mx.logsumexp(out, axis=-1, keepdims=True)
    textbook = mx.sum(p * (ref_lp - out_lp), axis=-1)
    return mx.maximum(mx.where(near, small, textbook), 0.0)


def failure_reason(error: BaseException) -> str:
    """What a client is told of a failed report: an engine error's own (safe) message; otherwise the
    error's type and message with host paths cut to their file names."""
    if isinstance(error, EngineError):
        return str(error)
    return f"{type(error).__name__}: " + re.sub(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)", r"\1", str(error))


class FidelityJob:
    """A dtype fidelity/speed report computed in small steps.

    `dtypes` are dtype names (aliases and `auto` allowed); float32, the reference, is always measured.
    `prompts` is the probe set (None: the bundled probe prompts). `task` is a `Task`, None, or "auto"
    (the held-out additions when `folder` is the bundled model).

    The job loads its own copies of the variants: the reference stays resident for the whole job, and
    one other variant at a time beside it.
    """

    def __init__(self, name: str, folder: str | Path, dtypes: Iterable[str] = DEFAULT_DTYPES,
                 prompts: Sequence[str] | None = None, task: Task | str | None = "auto", *,
                 greedy_tokens: int = 32, prefill_tokens: int = 128, decode_tokens: int = 32,
                 speed_repeats: int = 3, task_batch: int = 32, reference_cache_bytes: int = 256 * 2**20,
                 trust_remote_code: bool = False, show_paths: bool = False) -> None:
        self.name = name
        self.show_paths = show_paths  # file paths in the result (the BLAS library); names only otherwise
        self.folder = Path(folder)
        requested = [REFERENCE]
        for d in dtypes:
            d = normalize_dtype(d)
            if d not in requested:
                requested.append(d)
        self.dtypes = requested
        self._concrete = {d: (resolve_auto(self.folder) if d == AUTO else d) for d in requested}
        self._order = list(dict.fromkeys(self._concrete.values()))  # unique concrete dtypes, float32 first
        self.prompts = probe_set() if prompts is None else validate_prompts(prompts, source="probe prompts")
        if not self.prompts:
            raise ValueError("the probe set is empty")
        if task == "auto":
            task = bundled_task() if is_bundled(self.folder) else None
        elif task is not None and not isinstance(task, Task):
            raise ValueError(f"task must be a Task, None or 'auto', not {task!r}")
        self.task: Task | None = task
        for value, label in ((greedy_tokens, "greedy_tokens"), (prefill_tokens, "prefill_tokens"),
                             (decode_tokens, "decode_tokens"), (speed_repeats, "speed_repeats"),
                             (task_batch, "task_batch")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer")
        self.greedy_tokens = greedy_tokens
        self.prefill_tokens = prefill_tokens
        self.decode_tokens = decode_tokens
        self.speed_repeats = speed_repeats
        self.task_batch = task_batch
        self.reference_cache_bytes = reference_cache_bytes
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
        self._entries: dict[str, dict] = {}
        self._units_done = 0
        self._units_total = 1
        self._plan_iter: Iterator[None] | None = None

    # ---- driving ----------------------------------------------------------------------------
    def step(self) -> bool:
        """Do one step of work (a part of a unit: a prefill or one decode step); True once the job is done
        (then `result` is set)."""
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

    # ---- the plan ---------------------------------------------------------------------------
    def _plan(self) -> Iterator[None]:
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
                speed = yield from self._speed(variant)
                yield
            tally = _Tally()
            per_prompt: list[dict] = []
            for i in range(n_prompts):
                self.stage = f"{dtype}: prompt {i + 1}/{n_prompts}"
                per_prompt.append((yield from self._compare(variant, i, tally)))
                yield
            for j, chunk in enumerate(self._task_chunks):
                self.stage = f"{dtype}: task batch {j + 1}/{len(self._task_chunks)}"
                yield from self._task_batch(variant, chunk, tally)
                yield
            self._entries[dtype] = self._entry(dtype, variant, speed, tally, per_prompt)
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
        return 2 + n + sum(n + chunks + (0 if d == REFERENCE else 2) for d in self._order) + 1

    # ---- units ------------------------------------------------------------------------------
    def _load(self, dtype: str) -> LoadedModel:
        loaded = load_variant(self.name, self.folder, dtype, trust_remote_code=self.trust_remote_code)
        gc.collect()
        return loaded

    def _encode(self, tokenizer: Any, text: str) -> list[int]:
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
        length = max(min(self.prefill_tokens, ctx - self.decode_tokens - 1), 1)
        ids: list[int] = []
        while len(ids) < length:  # prompt by prompt: encoding a text beyond the context makes tokenizers warn
            before = len(ids)
            for prompt in self.prompts:
                ids += self._encode(tok, prompt + " ")
                if len(ids) >= length:
                    break
            if len(ids) == before:
                ids = [0]
        self._speed_ids = ids[:length]
        # task prompts grouped by token length, so each batch decodes without padding
        if self.task is not None:
            groups: dict[int, list[tuple[list[int], str]]] = {}
            for prompt, expected in self.task.items:
                ids = self._encode(tok, prompt)
                groups.setdefault(len(ids), []).append((ids, expected))
            self._task_chunks = [group[k:k + self.task_batch] for _, group in sorted(groups.items())
                                 for k in range(0, len(group), self.task_batch)]

    def _eos(self, loaded: LoadedModel) -> set[int]:
        return set(getattr(loaded.tokenizer, "eos_token_ids", None) or ())

    def _greedy(self, loaded: LoadedModel, ids: list[int], n: int) -> Iterator[object]:
        """Greedy tokens after `ids` with a KV cache: at most n, up to and including end of sequence
        (the generator's return value; it yields _PART after each model call)."""
        model, eos = loaded.model, self._eos(loaded)
        cache = make_prompt_cache(model)
        logits = model(mx.array(ids)[None], cache=cache)[:, -1, :]
        out: list[int] = []
        for k in range(n):
            token = int(mx.argmax(logits.astype(mx.float32), axis=-1).item())
            yield _PART
            out.append(token)
            if token in eos or k + 1 == n:
                break
            logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
        return out

    def _logits(self, loaded: LoadedModel, seq: list[int]) -> mx.array:
        """float32 logits at every position of `seq`, shape (len(seq), vocab), evaluated."""
        out = loaded.model(mx.array(seq)[None])[0].astype(mx.float32)
        mx.eval(out)
        return out

    def _prepare_reference(self, i: int) -> Iterator[object]:
        assert self._ref is not None
        ids = self._ids[i]
        greedy = yield from self._greedy(self._ref, ids, self.greedy_tokens)
        self._ref_greedy.append(greedy)
        eos = self._eos(self._ref)
        continuation = greedy[:-1] if greedy and greedy[-1] in eos else greedy
        seq = ids + continuation
        self._seqs.append(seq)
        logits = self._logits(self._ref, seq)
        if self._cached_bytes + logits.nbytes <= self.reference_cache_bytes:
            self._ref_logits[i] = logits
            self._cached_bytes += logits.nbytes

    def _compare(self, variant: LoadedModel, i: int, tally: _Tally) -> Iterator[object]:
        """The comparison of prompt `i` (the return value), counted into `tally`."""
        assert self._ref is not None
        seq = self._seqs[i]
        ref = self._ref_logits.get(i)
        if ref is None:
            ref = self._logits(self._ref, seq)
            yield _PART
        out = self._logits(variant, seq)
        out_finite = mx.isfinite(out)
        row_ok = mx.all(out_finite, axis=-1) & mx.all(mx.isfinite(ref), axis=-1)
        nonfinite = out.size - mx.sum(out_finite)
        kl = kl_divergence(ref, out)
        agree = (mx.argmax(ref, axis=-1) == mx.argmax(out, axis=-1)) & row_ok
        diff = mx.max(mx.abs(ref - out), axis=-1)
        mx.eval(row_ok, nonfinite, kl, agree, diff)
        ok = row_ok.tolist()
        kls = [k for k, good in zip(kl.tolist(), ok, strict=True) if good]
        diffs = [d for d, good in zip(diff.tolist(), ok, strict=True) if good]
        n_agree = int(mx.sum(agree).item())
        yield _PART
        greedy = yield from self._greedy(variant, self._ids[i], self.greedy_tokens)
        common = 0
        for a, b in zip(greedy, self._ref_greedy[i], strict=False):
            if a != b:
                break
            common += 1

        tally.positions += len(seq)
        tally.agree += n_agree
        tally.finite_positions += len(kls)
        tally.kl_sum += sum(kls)
        tally.kl_max = _max(tally.kl_max, max(kls) if kls else None)
        tally.max_diff = _max(tally.max_diff, max(diffs) if diffs else None)
        tally.logits += out.size
        tally.nonfinite += int(nonfinite.item())
        tally.greedy_total += common
        tally.prompts += 1
        return {"positions": len(seq), "top1_agreement": n_agree / len(seq),
                "kl_mean": sum(kls) / len(kls) if kls else None, "kl_max": max(kls) if kls else None,
                "max_abs_logit_diff": max(diffs) if diffs else None,
                "greedy_agreement_tokens": common, "reference_greedy_tokens": len(self._ref_greedy[i]),
                "nonfinite_logits": int(nonfinite.item())}

    def _task_batch(self, variant: LoadedModel, chunk: list[tuple[list[int], str]],
                    tally: _Tally) -> Iterator[object]:
        assert self.task is not None
        model, eos = variant.model, self._eos(variant)
        cache = make_prompt_cache(model)
        logits = model(mx.array([ids for ids, _ in chunk]), cache=cache)[:, -1, :]
        rows: list[list[int]] = [[] for _ in chunk]
        finished = [False] * len(chunk)
        for k in range(self.task.max_tokens):
            tokens = mx.argmax(logits.astype(mx.float32), axis=-1)
            picked = tokens.tolist()
            yield _PART
            for r, t in enumerate(picked):
                if not finished[r]:
                    if t in eos:
                        finished[r] = True
                    else:
                        rows[r].append(t)
            if all(finished) or k + 1 == self.task.max_tokens:
                break
            logits = model(tokens[:, None], cache=cache)[:, -1, :]
        for (_, expected), row in zip(chunk, rows, strict=True):
            text = variant.tokenizer.decode(row) if row else ""
            tally.task_ok += bool(self.task.is_correct(expected, text))
            tally.task_n += 1

    def _speed(self, loaded: LoadedModel) -> Iterator[object]:
        """Prefill and synchronous greedy decode with a KV cache, after one warm-up run; medians (the return
        value). Each model call is timed on its own, so the requests served between them do not count."""
        model = loaded.model
        x = mx.array(self._speed_ids)[None]

        def once() -> Iterator[object]:
            cache = make_prompt_cache(model)
            t0 = time.perf_counter()
            logits = model(x, cache=cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(y, [c.state for c in cache])
            prefill = time.perf_counter() - t0
            decode = 0.0
            for _ in range(self.decode_tokens):
                yield _PART
                t0 = time.perf_counter()
                logits = model(y[:, None], cache=cache)
                y = mx.argmax(logits[:, -1, :], axis=-1)
                mx.eval(y)
                decode += time.perf_counter() - t0
            yield _PART
            return prefill, decode

        yield from once()
        runs = []
        for _ in range(self.speed_repeats):
            runs.append((yield from once()))
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        return {"prefill_tok_s": round(len(self._speed_ids) / prefill, 1) if prefill > 0 else None,
                "decode_tok_s": round(self.decode_tokens / decode, 1) if decode > 0 else None}

    # ---- results ----------------------------------------------------------------------------
    def _entry(self, dtype: str, loaded: LoadedModel, speed: dict, tally: _Tally, per_prompt: list[dict]) -> dict:
        stats = loaded.stats
        share = tally.nonfinite / tally.logits if tally.logits else 0.0
        if tally.nonfinite:
            self.warnings.append(f"{dtype}: {share:.4%} of logits are non-finite (inf/nan) "
                                 f"({tally.nonfinite} of {tally.logits}); its KL and logit differences "
                                 f"cover the {tally.finite_positions} of {tally.positions} positions that are finite")
        return {
            "dtype": dtype,
            "bytes_by_dtype": dict(stats.bytes_by_dtype),
            "total_bytes": stats.final_bytes,
            "parameter_count": stats.parameter_count,
            "load_seconds": round(stats.load_seconds, 4),
            "prefill_tok_s": speed["prefill_tok_s"],
            "decode_tok_s": speed["decode_tok_s"],
            "positions": tally.positions,
            "top1_agreement": tally.agree / tally.positions if tally.positions else None,
            "kl_mean": _finite_or_none(tally.kl_sum / tally.finite_positions if tally.finite_positions else None),
            "kl_max": _finite_or_none(tally.kl_max),
            "max_abs_logit_diff": _finite_or_none(tally.max_diff),
            "mean_greedy_agreement_tokens": tally.greedy_total / tally.prompts if tally.prompts else None,
            "nonfinite_share": share,
            "task_accuracy": tally.task_ok / tally.task_n if tally.task_n else None,
            "per_prompt": [{k: _finite_or_none(v) if isinstance(v, float) else v for k, v in p.items()}
                           for p in per_prompt],
        }

    def _summary(self) -> dict:
        dtypes = {}
        for requested in self.dtypes:
            concrete = self._concrete[requested]
            entry = dict(self._entries[concrete])
            if requested != concrete:
                entry["alias_of"] = concrete  # `auto` is the checkpoint's dtype: the same variant
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
                      "repeats": self.speed_repeats, "method": "prefill, then synchronous greedy decode "
                      "with a KV cache, batch 1; median of the repeats after one warm-up"},
            "task": task,
            "device": device_info(),
            "blas": blas_info().as_dict(paths=self.show_paths),
            "dtypes": dtypes,
            "warnings": list(self.warnings),
        }


def run_report(folder: str | Path, dtypes: Iterable[str] = DEFAULT_DTYPES, prompts: Sequence[str] | None = None,
               task: Task | str | None = "auto", *, name: str | None = None,
               on_progress: Callable[[FidelityJob], None] | None = None, **options: Any) -> dict:
    """Run a whole `FidelityJob` on this thread and return its result."""
    job = FidelityJob(name or Path(folder).resolve().name, folder, dtypes, prompts, task, **options)
    return job.run(on_progress)


def main(argv: Sequence[str] | None = None) -> int:
    from models.report.probes import load_prompt_file

    p = argparse.ArgumentParser(prog="dtype-serve compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model_ref(), help="model folder (mlx-lm layout)")
    p.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES))
    p.add_argument("--prompts", help="extra probe prompts: one per line, or JSONL with {\"prompt\": ...}")
    p.add_argument("--no-bundled-prompts", action="store_true", help="probe with --prompts only")
    p.add_argument("--task-prompts", type=int, default=DEFAULT_TASK_PROMPTS,
                   help="held-out prompts for the bundled model's task accuracy (0: none)")
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--out", help="write the JSON report here (default: stdout)")
    p.add_argument("--chart", help="write a chart here (.png or .svg)")
    p.add_argument("--blas", default="auto", help="auto | none | PATH (see dtype-serve --help)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    configure_blas(args.blas)  # a no-op when already chosen at import

    try:
        user = load_prompt_file(args.prompts) if args.prompts else None
        prompts = probe_set(user, include_bundled=not args.no_bundled_prompts)
        folder = Path(args.model)
        task: Task | str | None = "auto"
        if is_bundled(folder):
            task = bundled_task(args.task_prompts) if args.task_prompts > 0 else None

        def show(job: FidelityJob) -> None:
            print(f"\r{job.progress:6.1%} {job.stage:<40}", end="", file=sys.stderr, flush=True)

        result = run_report(folder, args.dtypes, prompts, task, greedy_tokens=args.greedy_tokens,
                            trust_remote_code=args.trust_remote_code, on_progress=show)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.chart:
        from models.report.chart import render_chart

        render_chart(result, args.chart)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
