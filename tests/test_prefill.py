"""Bucket-shaped prefill (on by default on CUDA only): forced on here, it must change no answer."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from models.api import Finished, GenerationParams, TextDelta
from models.decode.prefill import BUCKETS, bucket, prefill
from models.decode.single_stream import SingleStream
from models.decode.warmup import warm_shapes
from models.engine.config import EngineConfig
from models.engine.engine import MLXEngine
from models.weights.catalog import ModelCatalog
from tests.conftest import BUNDLED


@pytest.fixture(scope="module")
def model():
    loaded, _ = load(str(BUNDLED))
    loaded.set_dtype(mx.float32)
    return loaded


def test_bucket_pads_to_the_next_bucket_and_no_more_than_half_again():
    assert [bucket(n) for n in (1, 16, 17, 100, 2048)] == [16, 16, 24, 128, 2048]
    assert bucket(3000) == 3000  # beyond the largest bucket: chunks of it, then the rest
    assert all(bucket(n) <= max(16, 1.5 * n) for n in range(1, 2049))


@pytest.mark.parametrize("length", [2, 17, 40, 130])
def test_padded_prefill_leaves_the_same_cache_and_tokens(model, length):
    prompt = [(7 * i + 3) % 90 + 5 for i in range(length)]
    plain = SingleStream(model, prompt, 12, None, [], set(), uid=-1)
    padded = SingleStream(model, prompt, 12, None, [], set(), uid=-1, pad_prefill=True)
    assert [c.offset for c in padded.cache] == [c.offset for c in plain.cache] == [length] * len(model.layers)
    steps = [(plain.step(), padded.step()) for _ in range(12)]
    assert [a.token for a, _ in steps] == [b.token for _, b in steps]
    for a, b in steps:
        assert mx.allclose(a.logprobs, b.logprobs, atol=1e-4).item()


def test_padded_prefill_after_a_cached_prefix(model):
    prompt = [(5 * i + 1) % 90 + 5 for i in range(70)]
    first = SingleStream(model, prompt[:50], 1, None, [], set(), uid=-1)
    tokens, cache = first.cached_context()
    assert len(tokens) == 50
    resumed = SingleStream(model, prompt, 8, None, [], set(), uid=-2, cache=cache, cached=50, pad_prefill=True)
    fresh = SingleStream(model, prompt, 8, None, [], set(), uid=-3)
    assert [resumed.step().token for _ in range(8)] == [fresh.step().token for _ in range(8)]


def test_chunks_longer_than_the_largest_bucket(model):
    cache_plain, cache_padded = make_prompt_cache(model), make_prompt_cache(model)
    tokens = mx.array([(3 * i) % 90 + 5 for i in range(BUCKETS[-1] + 37)])
    prefill(model, tokens, cache_plain, pad=False)
    prefill(model, tokens, cache_padded, pad=True)
    assert cache_padded[0].offset == cache_plain[0].offset == tokens.size
    for plain, padded in zip(cache_plain, cache_padded, strict=True):
        assert mx.allclose(plain.keys[..., :tokens.size, :], padded.keys[..., :tokens.size, :], atol=1e-4).item()


async def run(engine: MLXEngine, prompt: str) -> str:
    text = ""
    async for event in engine.generate(GenerationParams(prompt=prompt, max_tokens=6)):
        if isinstance(event, TextDelta):
            text += event.text
        assert not isinstance(event, Finished) or event.finish_reason in ("stop", "length")
    return text


async def test_engine_answers_alike_with_padding_and_warms_each_shape():
    catalog = ModelCatalog({BUNDLED.name: BUNDLED})
    prompts = ["17+25=", "3+4=", "17+25=", "120+7="]  # the second "17+25=" hits the prefix cache
    answers = {}
    for pad in (False, True):
        engine = MLXEngine(catalog, EngineConfig(BUNDLED.name, "float32", max_batch_size=4, pad_prefill=pad,
                                                  prompt_cache_bytes="0.05"))
        await engine.start()
        try:
            answers[pad] = [await run(engine, p) for p in prompts]
            if pad:  # every bucket under the 256-token context, and decode batches of 1 to 4
                assert await engine._call(engine._warm_shapes) == 2 * sum(b + 1 < 256 for b in BUCKETS) + 4
        finally:
            await engine.stop()
    assert answers[True] == answers[False]
    assert answers[True][0].startswith("42")


def test_caches_that_cannot_be_trimmed_back_are_not_padded(model):
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    seen = []

    def recording(inputs, cache):
        seen.append(inputs.shape[1])
        return model(inputs, cache=cache)

    tokens = mx.array([(3 * i) % 90 + 5 for i in range(21)])
    prefill(recording, tokens, [RotatingKVCache(max_size=64, keep=4) for _ in model.layers], pad=True)
    prefill(recording, tokens, [KVCache() for _ in model.layers], pad=True)
    assert seen == [21, 24]  # a sliding window would keep the padding's keys: no padding there


def test_shapes_are_warmed_on_the_generation_stream(model):
    """Set-up is kept per stream and per sequence of operations: the warm-up prefills through the
    padded prefill and decodes as a lone request does, on the generation stream."""
    from mlx_lm.generate import generation_stream

    streams, shapes = [], []

    class Recording:
        layers = model.layers

        def __call__(self, inputs, cache):
            streams.append(mx.default_stream(mx.default_device()))
            shapes.append(inputs.shape)
            return model(inputs, cache=cache)

    assert warm_shapes(Recording(), context=64, max_batch=2) == 2 * sum(b + 1 < 64 for b in BUCKETS) + 2
    # each bucket prefilled padded and full, each followed by a decode step; then the batch sizes
    assert shapes[:4] == [(1, 16), (1, 1), (1, 16), (1, 1)] and shapes[-2:] == [(1, 1), (2, 1)]
    with mx.stream(generation_stream):  # a stream per thread: this thread's
        expected = mx.default_stream(mx.default_device())
    assert streams and all(s == expected for s in streams)
    assert expected != mx.default_stream(mx.default_device())
