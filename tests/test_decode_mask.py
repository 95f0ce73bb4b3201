"""A one-token step has no mask while no row of the batch is padded (models.mlx_lm_ext.decode_mask), follows the
padding as rows join and leave, and decodes mlx-lm's tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache

from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from models.mlx_lm_ext.decode_mask import UnpaddedDecodeCache, unmask_unpadded
from tests.conftest import BUNDLED


def filled(left_padding: list[int], length: int = 6) -> BatchKVCache:
    cache = BatchKVCache(left_padding)
    keys = mx.random.normal((len(left_padding), 2, length, 8), key=mx.random.key(0))
    cache.update_and_fetch(keys, keys)
    return cache


def test_the_mask_goes_only_while_no_row_is_padded():
    cache = filled([0, 0, 0])
    unmask_unpadded([cache])
    assert type(cache) is UnpaddedDecodeCache
    assert cache.make_mask(1) is None
    assert cache.make_mask(3) is not None  # prefill-sized calls keep theirs
    assert cache.make_mask(1, window_size=4) is not None
    cache.extend(filled([0], length=4))  # a shorter row joins: padded by 2
    padded = cache.make_mask(1)
    assert padded is not None and padded.size > 0
    assert mx.array_equal(padded, BatchKVCache.make_mask(cache, 1)).item()
    cache.filter([3])  # only the padded row is left: filter shifts its padding away
    assert cache.make_mask(1) is None
    cache.state = filled([1, 0]).state
    assert cache.make_mask(1) is not None


def test_only_plain_batch_caches_are_changed():
    class Other(BatchKVCache):
        pass

    other = Other([0])
    unmask_unpadded([other])
    assert type(other) is Other
    unmask_unpadded(None)


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load(str(BUNDLED))
    model.set_dtype(mx.float32)
    return model, tokenizer


def decode(model, cls, prompts: list[list[int]], tokens: int = 10) -> tuple[list[list[int]], object]:
    gen = cls(model, max_tokens=tokens, completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    uids = gen.insert(prompts, max_tokens=[tokens] * len(prompts))
    out, done, masks = {uid: [] for uid in uids}, 0, set()
    while done < len(uids):
        for r in gen.next_generated():
            out[r.uid].append(r.token)
            done += r.finish_reason is not None
        batch = gen._generation_batch
        if batch is not None and batch.prompt_cache:
            masks.add(batch.prompt_cache[0].make_mask(1) is None)
    return [out[uid] for uid in uids], masks


@pytest.mark.parametrize("texts", [["12+30=", "45+11=", "70+22="], ["12+30=", "The dog ran fast", "7+7="]])
def test_decoding_gives_mlx_lms_tokens_with_and_without_padding(bundled, texts):
    model, tokenizer = bundled
    prompts = [tokenizer.encode(t) for t in texts]
    theirs, _ = decode(model, BatchGenerator, prompts)
    ours, unmasked = decode(model, LeanBatchGenerator, prompts)
    assert ours == theirs
    same_length = len({len(p) for p in prompts}) == 1
    assert unmasked == ({True} if same_length else {False})


def test_a_burst_of_short_prompts_is_prefilled_in_one_step_and_decodes_unmasked(bundled, monkeypatch):
    import models.mlx_lm_ext.batch_generator as decode_batch

    model, tokenizer = bundled
    prompts = [tokenizer.encode(f"{a}+{a + 3}=") for a in range(10, 26)]  # 16 prompts of one length
    theirs, _ = decode(model, BatchGenerator, prompts)

    def run(prefill_tokens: int) -> tuple[list[list[int]], int]:
        monkeypatch.setattr(decode_batch, "PREFILL_TOKENS", prefill_tokens)
        gen = LeanBatchGenerator(model, max_tokens=10, completion_batch_size=16, prefill_batch_size=4)
        uids = gen.insert(prompts, max_tokens=[10] * 16)
        out, done = {uid: [] for uid in uids}, 0
        while done < len(uids):
            for r in gen.next_generated():
                out[r.uid].append(r.token)
                done += r.finish_reason is not None
        return [out[uid] for uid in uids], gen.unmasked_steps

    together, unmasked = run(8 * 2048)
    assert together == theirs and unmasked >= 9  # all 16 joined at once: no row padded
    in_fours, padded = run(4)  # the budget holds only the configured 4 rows a step: later ones padded
    assert in_fours == theirs and padded <= unmasked - 5  # unmasked only while the first or last 4 ran alone
