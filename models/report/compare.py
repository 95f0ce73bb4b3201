"""The comparison maths of the dtype report: one precision's logits against the float32 reference's.

Per teacher-forced position: top-1 agreement of the argmax, KL(p_float32 || p_dtype), the largest
|logit difference| and non-finite logits; per prompt the length of greedy agreement. `Tally` sums them
over the probe set into the figures of a report entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx


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


def max_or_none(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def finite_or_none(x: float | None) -> float | None:
    """A figure as strict JSON can carry it: NaN and infinities become None."""
    return x if x is not None and math.isfinite(x) else None


def agreement_length(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    common = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        common += 1
    return common


@dataclass(frozen=True)
class LogitComparison:
    """One sequence's teacher-forced logits against the reference's. KL and |Δlogit| cover the rows
    where both are finite (`kls`, `diffs`); `agree` counts finite rows whose argmax is the reference's."""

    positions: int
    agree: int
    kls: list[float]
    diffs: list[float]
    logits: int
    nonfinite: int


def compare_logits(ref: mx.array, out: mx.array) -> LogitComparison:
    """`ref` and `out`: float32 logits of the same sequence, shape (positions, vocab)."""
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
    return LogitComparison(out.shape[0], int(mx.sum(agree).item()), kls, diffs, out.size, int(nonfinite.item()))


@dataclass
class Tally:
    """Running sums of one precision's comparison with the reference."""

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

    def add_prompt(self, c: LogitComparison, greedy: list[int], reference_greedy: list[int]) -> dict:
        """Count one probe prompt in (its logits and its greedy continuation against the reference's);
        its own figures (the report's `per_prompt` entry)."""
        greedy_common = agreement_length(greedy, reference_greedy)
        self.positions += c.positions
        self.agree += c.agree
        self.finite_positions += len(c.kls)
        self.kl_sum += sum(c.kls)
        self.kl_max = max_or_none(self.kl_max, max(c.kls) if c.kls else None)
        self.max_diff = max_or_none(self.max_diff, max(c.diffs) if c.diffs else None)
        self.logits += c.logits
        self.nonfinite += c.nonfinite
        self.greedy_total += greedy_common
        self.prompts += 1
        return {"positions": c.positions, "top1_agreement": c.agree / c.positions,
                "kl_mean": sum(c.kls) / len(c.kls) if c.kls else None, "kl_max": max(c.kls) if c.kls else None,
                "max_abs_logit_diff": max(c.diffs) if c.diffs else None,
                "greedy_agreement_tokens": greedy_common, "reference_greedy_tokens": len(reference_greedy),
                "greedy_tokens": list(greedy), "nonfinite_logits": c.nonfinite}

    @property
    def nonfinite_share(self) -> float:
        return self.nonfinite / self.logits if self.logits else 0.0

    def figures(self) -> dict:
        """The fidelity figures of a report entry (strict JSON: None where undefined)."""
        return {
            "positions": self.positions,
            "top1_agreement": self.agree / self.positions if self.positions else None,
            "kl_mean": finite_or_none(self.kl_sum / self.finite_positions if self.finite_positions else None),
            "kl_max": finite_or_none(self.kl_max),
            "max_abs_logit_diff": finite_or_none(self.max_diff),
            "mean_greedy_agreement_tokens": self.greedy_total / self.prompts if self.prompts else None,
            "nonfinite_share": self.nonfinite_share,
            "task_accuracy": self.task_ok / self.task_n if self.task_n else None,
        }
