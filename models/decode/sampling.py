"""Per-request samplers. A seeded sampler owns its random state, so its draws do not depend on
which other requests share the batch. Unseeded requests with the same settings share one sampler,
so that mlx-lm's BatchGenerator samples all their rows in one call rather than one call per row.

On the CPU, top-p sampling runs in numpy: MLX's CPU sort, which top-p needs over the whole vocabulary,
took longer than the model's own step (32 rows of 32,000 tokens: ~95 ms; numpy ~33 ms for the same
threshold). Without top-p, sampling stays in the step's graph (CategoricalSampler): a draw on the host
waits for the step's logits, so the next step could not be queued meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_top_p

Sampler = Callable[[mx.array], mx.array]


def make_request_sampler(temperature: float, top_p: float, seed: int | None) -> Sampler | None:
    """None means greedy (the batch's shared argmax sampler)."""
    if temperature <= 0:
        return None
    if not 0 < top_p < 1:  # temperature alone: drawn in the step's graph, on any device
        if seed is None:
            return _shared_categorical(float(temperature))
        return CategoricalSampler(temperature, np.random.default_rng(seed))
    on_cpu = mx.default_device() == mx.cpu
    if seed is None:
        return _shared_sampler(on_cpu, float(temperature), float(top_p))
    if on_cpu:
        return HostSampler(temperature, top_p, np.random.default_rng(seed))
    return _device_sampler(temperature, top_p, mx.random.key(seed))


@lru_cache(maxsize=64)
def _shared_categorical(temperature: float) -> Sampler:
    """One sampler object per temperature: rows of a batch that all hold it are drawn in one call."""
    return CategoricalSampler(temperature, np.random.default_rng())


@lru_cache(maxsize=64)
def _shared_sampler(on_cpu: bool, temperature: float, top_p: float) -> Sampler:
    """One sampler object per setting: rows of a batch that all hold it are drawn in one call."""
    if on_cpu:
        return HostSampler(temperature, top_p, np.random.default_rng())
    return _device_sampler(temperature, top_p, None)


def _device_sampler(temperature: float, top_p: float, key: mx.array | None) -> Sampler:
    """mlx-lm's top-p (0 < top_p < 1: temperature alone is CategoricalSampler's) and MLX's categorical; `key`
    None draws from MLX's global random state."""
    state = [key]

    def sample(logprobs: mx.array) -> mx.array:
        logprobs = apply_top_p(logprobs, top_p)
        draw = None
        if state[0] is not None:
            state[0], draw = mx.random.split(state[0])
        return mx.random.categorical(logprobs * (1.0 / temperature), key=draw)

    return sample


class CategoricalSampler:
    """Temperature sampling in the step's graph, by inverse CDF as HostSampler draws: one uniform number
    per row, from `rng` on the host (MLX's categorical makes one per token: ~2x the time on a CPU), so the
    step is queued before anything is read. Each row is shifted to a maximum of 0 first, so raw logits draw
    as log-probabilities do."""

    accepts_logits = True

    def __init__(self, temperature: float, rng: np.random.Generator) -> None:
        # finite however small the temperature: 0 x inf would make the row's best score NaN
        self.scale = mx.array(min(1.0 / temperature, 1e30), dtype=mx.float32)
        self.rng = rng

    def __call__(self, scores: mx.array) -> mx.array:
        rows = scores.reshape(-1, scores.shape[-1]).astype(mx.float32)
        mass = mx.cumsum(_weights(rows, rows.max(axis=-1, keepdims=True), self.scale), axis=-1)
        # in (0, 1]: scaled to the row's total, the first token whose cumulative mass reaches it has a weight above 0
        u = mx.array((1.0 - self.rng.random((rows.shape[0], 1))).astype(np.float32))
        return _first_reaching(mass, u).astype(mx.uint32).reshape(scores.shape[:-1])


@mx.compile
def _weights(rows: mx.array, peak: mx.array, scale: mx.array) -> mx.array:
    # one fused kernel: MLX's own exp on the CPU takes ~4x as long (models.platform.compile_cache)
    return mx.exp((rows - peak) * scale)


@mx.compile
def _first_reaching(mass: mx.array, u: mx.array) -> mx.array:
    return (mass < u * mass[:, -1:]).sum(axis=-1)


class HostSampler:
    """Top-p (the rule of mlx-lm's `apply_top_p`) and categorical sampling with numpy, for the CPU,
    where MLX arrays and numpy share memory. Draws by inverse CDF: one uniform number per row."""

    def __init__(self, temperature: float, top_p: float, rng: np.random.Generator) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.rng = rng

    # Each row is shifted to a maximum of 0 first, so raw logits sample as their log-probabilities do
    # (models.decode.step_rules then skips the normalization).
    accepts_logits = True

    def __call__(self, logprobs: mx.array) -> mx.array:
        values = np.asarray(logprobs.astype(mx.float32))  # evaluates this step's logits
        rows = values.reshape(-1, values.shape[-1])
        rows = rows - rows.max(axis=-1, keepdims=True)
        if 0 < self.top_p < 1:
            rows = np.where(rows < top_p_threshold(rows, self.top_p), -np.inf, rows)
        # float64: a temperature below float32's range would divide by zero; the rest underflow to weight 0
        with np.errstate(over="ignore"):
            weights = np.exp(rows / np.float64(self.temperature))
        mass = np.cumsum(weights, axis=-1)
        # u in (0, total]: the first token whose cumulative mass reaches it has a weight above 0
        u = (1.0 - self.rng.random(len(rows))) * mass[:, -1]
        tokens = (mass < u[:, None]).sum(axis=-1)
        return mx.array(tokens.reshape(values.shape[:-1]).astype(np.uint32))


CANDIDATES = 1024  # a trained model's nucleus is usually far smaller than its vocabulary


def top_p_threshold(rows: np.ndarray, top_p: float) -> np.ndarray:
    """Per row, the smallest log-probability kept by top-p: a token is kept while the mass of the
    tokens ranked above it is below `top_p` of the total (mlx-lm's rule; ties are kept).

    With a large vocabulary only the CANDIDATES most likely tokens are sorted (a partition finds
    them), unless some row's nucleus reaches beyond them; then the whole rows are sorted."""
    vocab = rows.shape[-1]
    if vocab > 4 * CANDIDATES:
        total = np.exp(rows).sum(axis=-1, keepdims=True)
        ranked = -np.sort(-np.partition(rows, vocab - CANDIDATES, axis=-1)[:, vocab - CANDIDATES:], axis=-1)
        mass = np.cumsum(np.exp(ranked), axis=-1)
        if (mass[:, -1:] >= top_p * total).all():
            return _cut(ranked, mass, top_p * total)
    ranked = -np.sort(-rows, axis=-1)  # largest first
    mass = np.cumsum(np.exp(ranked), axis=-1)
    return _cut(ranked, mass, top_p * mass[:, -1:])


def _cut(ranked: np.ndarray, mass: np.ndarray, limit: np.ndarray) -> np.ndarray:
    kept = 1 + (mass[:, :-1] < limit).sum(axis=-1)
    return ranked[np.arange(len(ranked)), kept - 1][:, None]
