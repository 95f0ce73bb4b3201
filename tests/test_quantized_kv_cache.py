"""The quantized KV cache (models.mlx_lm_ext.quantized_batch_cache): a lone stream and the batch decode
mlx-lm's greedy tokens with its QuantizedKVCache (mlx_lm's generate_step with kv_bits, quantized from the
first token), token for token, while rows join, leave, come from a lone stream or from the prefix cache."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from models.decode.single_stream import SingleStream
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from models.mlx_lm_ext.quantized_batch_cache import QuantizedBatchKVCache, quantize_layers
from tests.conftest import BUNDLED

PROMPTS = ["12+30=", "The dog ran", "7+7=", "A quick brown fox jumps over the lazy dog and"]
TOKENS = 20
GROUP = 32  # the bundled model's head_dim (64 does not divide it)


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load(str(BUNDLED))
    model.set_dtype(mx.float32)  # no bfloat16 ties: the batch's rounding cannot pick the other token
    return model, tokenizer


def reference(model, tokens: list[int], bits: int, count: int = TOKENS) -> list[int]:
    steps = generate_step(mx.array(tokens), model, max_tokens=count, kv_bits=bits, kv_group_size=GROUP,
                          quantized_kv_start=0)
    return [int(token) for (token, _), _ in zip(steps, range(count), strict=False)]


def decode(generator: LeanBatchGenerator, uids: list[int], counts: dict[int, int]) -> dict[int, list[int]]:
    out = {uid: [] for uid in uids}
    while any(len(out[u]) < counts[u] for u in uids):
        for r in generator.next_generated():
            out[r.uid].append(r.token)
    return out


def generation_layers(generator: LeanBatchGenerator) -> list:
    return generator._generation_batch.prompt_cache


@pytest.mark.parametrize("bits", [8, 4])
def test_a_lone_stream_decodes_mlx_lms_quantized_kv_tokens(bundled, bits):
    model, tokenizer = bundled
    for prompt in PROMPTS:
        tokens = tokenizer.encode(prompt)
        stream = SingleStream(model, tokens, TOKENS, None, [], set(), -1, kv=(GROUP, bits))
        assert [stream.step().token for _ in range(TOKENS)] == reference(model, tokens, bits), prompt
        assert all(type(c) is QuantizedKVCache and c.bits == bits for c in stream.cache)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_batch_decodes_mlx_lms_quantized_kv_tokens_as_rows_join_and_leave(bundled, bits):
    model, tokenizer = bundled
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    counts = [TOKENS, 6, TOKENS, 11]  # two rows leave early
    gen = LeanBatchGenerator(model, kv=(GROUP, bits), completion_batch_size=8, prefill_batch_size=8)
    first = gen.insert(prompts[:2], max_tokens=counts[:2])
    out = {uid: [] for uid in first}
    for _ in range(3):  # the first two decode a few steps before the others join
        for r in gen.next_generated():
            out[r.uid].append(r.token)
    assert all(type(c) is QuantizedBatchKVCache and c.bits == bits for c in generation_layers(gen))
    later = gen.insert(prompts[2:], max_tokens=counts[2:])
    uids = first + later
    want = dict(zip(uids, counts, strict=True))
    for uid, tokens in decode(gen, uids, {u: want[u] - len(out.get(u, [])) for u in uids}).items():
        out.setdefault(uid, []).extend(tokens)
    for uid, prompt, count in zip(uids, prompts, counts, strict=True):
        assert out[uid] == reference(model, prompt, bits, count), tokenizer.decode(prompt)


def test_a_lone_streams_quantized_cache_hands_over_to_the_batch(bundled):
    """The hand-off: a lone stream decodes, then goes on in the batch beside a newcomer, with its cache."""
    model, tokenizer = bundled
    tokens, other = tokenizer.encode(PROMPTS[3]), tokenizer.encode(PROMPTS[0])
    stream = SingleStream(model, tokens, TOKENS, None, [], set(), -1, kv=(GROUP, 8))
    alone = [stream.step().token for _ in range(5)]
    step, cache, context, left = stream.handoff()
    gen = LeanBatchGenerator(model, kv=(GROUP, 8), completion_batch_size=8, prefill_batch_size=8)
    newcomer = gen.insert([other], max_tokens=[TOKENS])[0]
    moved = gen.insert([[step.token]], max_tokens=[left], caches=[cache], all_tokens=[context])[0]
    out = decode(gen, [newcomer, moved], {newcomer: TOKENS, moved: left})
    assert alone + [step.token] + out[moved] == reference(model, tokens, 8)
    assert out[newcomer] == reference(model, other, 8)


def test_a_finished_rows_cache_leaves_quantized_and_is_reused_like_a_lone_streams(bundled):
    """A finished row's cache (for the prefix cache) holds exactly its tokens; a later request that reuses
    it decodes in the batch what a lone stream decodes from the same cache."""
    model, tokenizer = bundled
    tokens = tokenizer.encode(PROMPTS[1])
    gen = LeanBatchGenerator(model, kv=(GROUP, 8), completion_batch_size=8, prefill_batch_size=8)
    uid = gen.insert([tokens], max_tokens=[6])[0]
    finished = None
    while finished is None:
        finished = next((r for r in gen.next_generated() if r.uid == uid and r.finish_reason), None)
    stored, held = finished.prompt_cache, finished.all_tokens
    assert all(type(c) is QuantizedKVCache and c.offset == len(held) for c in stored)
    follow = held + tokenizer.encode(" and then")
    lone = SingleStream(model, follow, 10, None, [], set(), -1, cache=copy.deepcopy(stored), cached=len(held),
                        kv=(GROUP, 8))
    expected = [lone.step().token for _ in range(10)]
    gen2 = LeanBatchGenerator(model, kv=(GROUP, 8), completion_batch_size=8, prefill_batch_size=8)
    reused, fresh = gen2.insert([follow[len(held):], tokens], max_tokens=[10, 10],
                                caches=[copy.deepcopy(stored), None], all_tokens=[held, []])
    out = decode(gen2, [reused, fresh], {reused: 10, fresh: 10})
    assert out[reused] == expected
    assert out[fresh] == reference(model, tokens, 8, 10)


def lone_caches(model, tokenizer, bits: int) -> list[list]:
    caches = []
    for prompt in PROMPTS:
        cache = make_prompt_cache(model)
        model(mx.array(tokenizer.encode(prompt))[None], cache=cache)
        quantize_layers(cache, GROUP, bits)
        mx.eval([c.state for c in cache])
        caches.append(cache)
    return caches


def same_tokens(a: QuantizedKVCache, b: QuantizedKVCache) -> bool:
    return a.offset == b.offset and all(
        mx.array_equal(x[..., : a.offset, :], y[..., : b.offset, :]).item()
        for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values), strict=True))


def test_merge_filter_extend_and_extract_keep_each_rows_tokens(bundled):
    model, tokenizer = bundled
    caches = [layers[0] for layers in lone_caches(model, tokenizer, 4)]
    merged = QuantizedBatchKVCache.merge([*caches[:2], KVCache()], group_size=GROUP, bits=4)
    assert merged.left_padding.tolist() == [max(c.offset for c in caches[:2]) - c.offset for c in caches[:2]] + \
        [max(c.offset for c in caches[:2])]
    assert all(same_tokens(merged.extract(i), c) for i, c in enumerate(caches[:2]))
    merged.filter([1])  # the first leaves: the padding all rows share is dropped
    assert merged.left_padding.tolist() == [0] and same_tokens(merged.extract(0), caches[1])
    merged.extend(QuantizedBatchKVCache.merge(caches[2:], group_size=GROUP, bits=4))
    assert all(same_tokens(merged.extract(i), c) for i, c in enumerate([caches[1], *caches[2:]]))
    assert merged.nbytes == sum(p.nbytes for p in (*merged.keys, *merged.values))
