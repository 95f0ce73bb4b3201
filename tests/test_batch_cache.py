"""Reused KV caches join the batch (models.mlx_lm_ext.batch_cache): merged like mlx-lm merges them, with room for
the next tokens, and moved from prefill to decoding without copies; the tokens stay mlx-lm's."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from models.mlx_lm_ext.batch_cache import MovingPromptBatch, merge_with_room
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from tests.conftest import BUNDLED

PROMPTS = ["12+30=", "The dog ran", "7+7=", "A quick brown fox jumps"]


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load(str(BUNDLED))
    model.set_dtype(mx.float32)
    return model, tokenizer


def prefilled(model, tokens: list[int]) -> list[KVCache]:
    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_merge_with_room_holds_what_mlx_lms_merge_holds_and_room_for_more(bundled):
    model, tokenizer = bundled
    layers = [prefilled(model, tokenizer.encode(p)) for p in PROMPTS]
    caches = [layer[0] for layer in layers] + [KVCache()]  # and a sequence without history
    ours, theirs = merge_with_room(caches), BatchKVCache.merge(caches)
    assert ours._idx == theirs._idx and ours.keys.shape[2] >= ours._idx + BatchKVCache.step // 2
    assert ours.left_padding.tolist() == theirs.left_padding.tolist()
    assert ours.offset.tolist() == theirs.offset.tolist()
    for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
        assert mx.array_equal(a[..., : ours._idx, :], b).item()
    before = ours.keys
    rows, heads, _, width = ours.keys.shape
    ours.update_and_fetch(mx.zeros((rows, heads, 1, width)), mx.zeros((rows, heads, 1, ours.values.shape[3])))
    assert ours.keys.shape == before.shape  # the next token fits: no regrowth


def test_moving_every_row_hands_over_the_caches_and_a_partial_split_copies(bundled):
    model, tokenizer = bundled
    caches = [prefilled(model, tokenizer.encode(p)) for p in PROMPTS[:3]]

    def batch():
        b = MovingPromptBatch.empty(model, None)
        b.extend(MovingPromptBatch(model=model, uids=[0, 1, 2], caches=copy.deepcopy(caches),
                                   tokens=[[1], [2], [3]], samplers=[None] * 3, fallback_sampler=None,
                                   logits_processors=[()] * 3, max_tokens=[4] * 3, stop_sequences=[None] * 3))
        return b

    whole = batch()
    layers = whole.prompt_cache
    moved = whole.split([2, 0, 1])
    assert moved.prompt_cache is layers and moved.uids == [0, 1, 2]
    assert len(whole) == 0 and whole.prompt_cache == []
    part = batch()
    kept = part.split([1])
    assert kept.uids == [1] and part.uids == [0, 2] and kept.prompt_cache is not part.prompt_cache


def test_cached_prompts_decode_to_mlx_lms_tokens(bundled):
    """Sequences with reused caches of different lengths (and one without) join together."""
    model, tokenizer = bundled
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def run(cls):
        caches = [prefilled(model, p[:-2]) for p in prompts[:3]] + [None]
        gen = cls(model, completion_batch_size=8, prefill_batch_size=8)
        uids = gen.insert([p[-2:] for p in prompts[:3]] + [prompts[3]], max_tokens=[12] * 4, caches=caches,
                          all_tokens=[p[:-2] for p in prompts[:3]] + [[]])
        out = {uid: [] for uid in uids}
        while sum(map(len, out.values())) < 12 * 4:
            for r in gen.next_generated():
                out[r.uid].append(r.token)
        return [out[uid] for uid in uids]

    assert run(LeanBatchGenerator) == run(BatchGenerator)


def test_merged_buffers_hold_room_for_what_the_rows_can_write(bundled):
    """Cached prompts joining with few tokens to generate get buffers for those (not a whole step of 256
    positions), never regrow, and decode to mlx-lm's tokens."""
    model, tokenizer = bundled
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    longest = max(len(p) for p in prompts) - 1
    limits = [5, 9, 7]

    def run(cls):
        caches = [prefilled(model, p[:-1]) for p in prompts]
        gen = cls(model, completion_batch_size=8, prefill_batch_size=8)
        uids = gen.insert([p[-1:] for p in prompts], max_tokens=limits, caches=caches,
                          all_tokens=[p[:-1] for p in prompts])
        out, rooms = {uid: [] for uid in uids}, []
        while sum(map(len, out.values())) < sum(limits):
            for r in gen.next_generated():
                out[r.uid].append(r.token)
            if gen._generation_batch.prompt_cache:
                rooms.append(gen._generation_batch.prompt_cache[0].keys.shape[2])
        return [out[uid] for uid in uids], rooms

    ours, rooms = run(LeanBatchGenerator)
    assert rooms[0] == longest + 1 + max(limits) < BatchKVCache.step  # the last prompt token, then up to 9
    assert max(rooms) == rooms[0]  # never regrown
    assert ours == run(BatchGenerator)[0]
