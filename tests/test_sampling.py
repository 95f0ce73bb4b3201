"""Samplers: the CPU's numpy top-p keeps what mlx-lm's keeps, its draws follow the distribution,
seeds reproduce, and unseeded requests with the same settings share one sampler (one call per batch)."""

import asyncio

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_top_p

from models.decode.sampling import HostSampler, make_request_sampler, top_p_threshold
from tests.test_registry import app_client, close


def _logprobs(rows: int, vocab: int, scale: float, dtype=mx.float32) -> mx.array:
    x = mx.random.normal((rows, vocab), key=mx.random.key(7)) * scale
    return (x - mx.logsumexp(x, axis=-1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("scale", [0.3, 3.0, 10.0])  # flat to peaked distributions
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("vocab", [3000, 20_000])  # 20,000: the peaked rows take the partition's shortcut
def test_top_p_keeps_what_mlx_lm_keeps(dtype, scale, top_p, vocab):
    lp = _logprobs(8, vocab, scale, dtype)
    theirs = (~mx.isinf(apply_top_p(lp, top_p))).sum(axis=-1).tolist()
    values = np.asarray(lp.astype(mx.float32))
    ours = (values >= top_p_threshold(values, top_p)).sum(axis=-1).tolist()
    # the same token counts, give or take the one token at the boundary (float32 sums, rounded apart)
    assert all(abs(a - b) <= 1 for a, b in zip(ours, theirs, strict=True)), (ours, theirs)
    if scale == 10.0:
        assert ours == theirs


def test_host_draws_follow_the_distribution_within_the_nucleus():
    probs = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    lp = mx.array(np.log(np.tile(probs, (20_000, 1))).astype(np.float32))
    tokens = np.array(HostSampler(1.0, 0.85, np.random.default_rng(0))(lp))
    assert tokens.shape == (20_000,)
    assert set(tokens.tolist()) <= {0, 1, 2}  # 0.5 + 0.25 < 0.85: the third is kept, the rest are not
    freq = np.bincount(tokens, minlength=5)[:3] / len(tokens)
    assert np.allclose(freq, probs[:3] / probs[:3].sum(), atol=0.015), freq
    cold = np.array(HostSampler(0.25, 1.0, np.random.default_rng(1))(lp))  # temperature sharpens
    assert (cold == 0).mean() > 0.9


@pytest.mark.parametrize("temperature", [1e-30, 1e-46, 1e-300])
def test_a_temperature_below_float32s_range_draws_the_argmax_without_warnings(temperature):
    logits = mx.array([[0.5, 3.0, -1.0, 2.9], [7.0, 1.0, 6.5, 0.0]])
    with np.errstate(divide="raise", invalid="raise"):  # as schemathesis found: both, at float32
        tokens = HostSampler(temperature, 1.0, np.random.default_rng(0))(logits)
    assert tokens.tolist() == [1, 0]


def test_seeds_reproduce_and_unseeded_settings_share_one_sampler():
    lp = _logprobs(4, 500, 1.0)
    draws = [make_request_sampler(0.8, 0.95, seed)(lp).tolist() for seed in (3, 3, 4)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert make_request_sampler(0.8, 0.95, None) is make_request_sampler(0.8, 0.95, None)
    assert make_request_sampler(0.8, 0.95, None) is not make_request_sampler(0.9, 0.95, None)
    assert make_request_sampler(0.8, 0.95, 3) is not make_request_sampler(0.8, 0.95, 3)
    assert make_request_sampler(0.0, 0.95, None) is None  # greedy: the batch's argmax


async def test_concurrent_sampled_requests_are_drawn_in_one_call_per_step(monkeypatch):
    import models.decode.sampling as sampling

    calls: list[int] = []
    original = HostSampler.__call__

    def counted(self, logprobs):
        calls.append(logprobs.shape[0] if logprobs.ndim > 1 else 1)
        return original(self, logprobs)

    monkeypatch.setattr(sampling.HostSampler, "__call__", counted)
    app, ctx, client = await app_client(max_batch_size=8, max_queue=8)
    try:
        body = {"prompt": "The dog", "dtype": "float32", "max_tokens": 12, "ignore_eos": True,
                "temperature": 0.9, "top_p": 0.9}
        replies = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(4)))
        assert all(r.status_code == 200 for r in replies)
        assert all(r.json()["usage"]["completion_tokens"] == 12 for r in replies)
        assert max(calls) == 4  # the four rows of a step in one call, not four calls of one row
    finally:
        await close(ctx, client)


def test_device_sampler_keeps_to_the_nucleus_and_its_seed():
    """The Metal/CUDA path (mlx-lm's top-p, MLX's categorical), run here on the CPU device."""
    from models.decode.sampling import _device_sampler

    probs = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    lp = mx.array(np.log(np.tile(probs, (2000, 1))).astype(np.float32))
    tokens = np.array(_device_sampler(1.0, 0.85, None)(lp))
    assert tokens.shape == (2000,) and set(tokens.tolist()) <= {0, 1, 2}
    seeded = [_device_sampler(1.0, 0.85, mx.random.key(5))(lp).tolist() for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_temperature_alone_draws_in_the_graph_from_logits_as_from_logprobs():
    """Without top-p the CPU draws with MLX's categorical (the next step can be queued before the draw is
    read): softmax(scores / temperature) frequencies, the same for raw and shifted scores, reproducible
    per seed, and the argmax for a temperature below float32's range."""
    from models.decode.sampling import CategoricalSampler
    from models.decode.step_rules import accepts_logits

    assert isinstance(make_request_sampler(0.8, 1.0, None), CategoricalSampler)
    assert isinstance(make_request_sampler(0.8, 1.0, 7), CategoricalSampler)
    # unseeded rows of one temperature share a sampler: the batch draws them in one call
    assert make_request_sampler(0.8, 1.0, None) is make_request_sampler(0.8, 1.0, None)
    assert make_request_sampler(0.8, 1.0, None) is not make_request_sampler(0.9, 1.0, None)
    assert isinstance(make_request_sampler(0.8, 0.9, None), HostSampler)  # top-p stays in numpy
    assert accepts_logits(make_request_sampler(0.8, 1.0, None))
    probs = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = mx.array(np.log(np.tile(probs, (4000, 1))).astype(np.float32) + 3.0)  # not normalized
    for temperature in (1.0, 0.5):
        expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
        for scores in (logits, logits - mx.logsumexp(logits, axis=-1, keepdims=True)):
            tokens = np.array(make_request_sampler(temperature, 1.0, None)(scores))
            assert np.allclose(np.bincount(tokens, minlength=5) / len(tokens), expected, atol=0.025)
    draws = [make_request_sampler(0.8, 1.0, seed)(logits[:50]).tolist() for seed in (3, 3, 4)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    tiny = mx.array([[0.5, 3.0, -1.0, 2.9], [7.0, 1.0, 6.5, 0.0]])
    for temperature in (1e-30, 1e-46, 1e-300):
        assert make_request_sampler(temperature, 1.0, 1)(tiny).tolist() == [1, 0]
