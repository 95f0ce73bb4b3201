"""The lean decode step (models.mlx_lm_ext.batch_generator): greedy float32 rows skip the log-sum-exp, give the
tokens mlx-lm's own step gives, and every row is normalized again as soon as one needs it."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from models.decode.sampling import HostSampler
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from tests.conftest import BUNDLED
from tests.test_registry import app_client, close

PROMPTS = ["12+30=", "The dog", "7+7=", "A quick brown fox jumps", "99+1="]


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load(str(BUNDLED))
    return model, tokenizer


def decode(cls, model, prompts, tokens=24, logprob_rows=(), samplers=None):
    """Every row's tokens and the score vectors of its decode steps (not its first token's)."""
    reading: set[int] = set()
    lean = {"reads_logprobs": reading.__contains__} if cls is LeanBatchGenerator else {}
    gen = cls(model, max_tokens=tokens, completion_batch_size=8, prefill_batch_size=8, **lean)
    uids = gen.insert(prompts, max_tokens=[tokens] * len(prompts), samplers=samplers)
    reading.update(uids[i] for i in logprob_rows)
    out = {uid: ([], []) for uid in uids}
    finished = 0
    while finished < len(uids):
        for r in gen.next_generated():
            out[r.uid][0].append(r.token)
            out[r.uid][1].append(r.logprobs)
            finished += r.finish_reason is not None
    return [out[uid] for uid in uids]


def normalized(scores: mx.array) -> bool:
    """log-probabilities (to the precision of their dtype), not raw logits"""
    tolerance = 1e-3 if scores.dtype == mx.float32 else 0.05
    return abs(mx.logsumexp(scores.astype(mx.float32)).item()) < tolerance


def test_greedy_float32_rows_keep_their_logits_and_mlx_lms_tokens(bundled):
    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = decode(BatchGenerator, model, prompts)
    lean = decode(LeanBatchGenerator, model, prompts)
    assert [tokens for tokens, _ in lean] == [tokens for tokens, _ in reference]
    for _, scores in lean:
        assert normalized(scores[0])  # the first token comes from mlx-lm's step (end of prefill)
        assert not any(normalized(s) for s in scores[2:])  # decode steps: raw logits
        assert all(s.shape == scores[0].shape for s in scores)


def test_one_row_that_reads_logprobs_normalizes_the_batch(bundled):
    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = decode(BatchGenerator, model, prompts)
    lean = decode(LeanBatchGenerator, model, prompts, logprob_rows=[1])
    assert [tokens for tokens, _ in lean] == [tokens for tokens, _ in reference]
    for (_, scores), (_, expected) in zip(lean, reference, strict=True):
        assert all(normalized(s) for s in scores)
        assert all(mx.allclose(s, e, atol=1e-5).item() for s, e in zip(scores, expected, strict=True))


def test_sampled_rows_and_other_dtypes_keep_mlx_lms_step(bundled):
    model, tokenizer = bundled
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    model.set_dtype(mx.float32)
    sampler = make_sampler(0.8, 0.9)
    rows = decode(LeanBatchGenerator, model, prompts, samplers=[None, sampler, None])
    assert all(normalized(s) for _, scores in rows for s in scores)
    model.set_dtype(mx.bfloat16)  # argmax over rounded bfloat16 logprobs can differ from the logits'
    try:
        reference = decode(BatchGenerator, model, prompts)
        lean = decode(LeanBatchGenerator, model, prompts)
        assert [t for t, _ in lean] == [t for t, _ in reference]
        assert all(normalized(s) for _, scores in lean for s in scores)
    finally:
        model.set_dtype(mx.float32)


async def test_a_logprobs_request_batched_with_greedy_ones_gets_real_logprobs():
    """Through the engine: the greedy requests' text is what each gives alone, and the logprobs
    request's values are log-probabilities (its top alternatives' probabilities sum to at most 1)."""
    app, ctx, client = await app_client(max_batch_size=8, max_queue=8)
    try:
        plain = [{"prompt": p, "dtype": "float32", "max_tokens": 12, "ignore_eos": True} for p in PROMPTS[:3]]
        body = {"model": "tiny-arith:float32", "prompt": "The dog", "max_tokens": 12, "logprobs": 3,
                "temperature": 0}

        async def post(path, payload):
            r = await client.post(path, json=payload)
            assert r.status_code == 200, r.text
            return r.json()

        alone = [(await post("/generate", p))["text"] for p in plain]
        solo = await post("/v1/completions", body)
        together = await asyncio.gather(post("/v1/completions", body), *(post("/generate", p) for p in plain))
        assert [r["text"] for r in together[1:]] == alone
        for result in (solo, together[0]):
            logprobs = result["choices"][0]["logprobs"]
            assert len(logprobs["token_logprobs"]) >= 4
            assert all(v <= 0 for v in logprobs["token_logprobs"])
            for top in logprobs["top_logprobs"]:
                assert sum(2.718281828 ** v for v in top.values()) <= 1 + 1e-4
        assert together[0]["choices"][0]["text"] == solo["choices"][0]["text"]
        assert together[0]["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            solo["choices"][0]["logprobs"]["token_logprobs"], abs=1e-3)
    finally:
        await close(ctx, client)


def test_the_cpu_sampler_draws_alike_from_logits_and_logprobs_so_its_rows_stay_lean(bundled):
    mx.random.seed(3)
    logits = mx.random.normal((4, 1000)) * 4 + 25  # far from normalized
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for temperature, top_p in ((0.7, 0.9), (1.0, 1.0), (0.3, 0.5)):
        draws = [HostSampler(temperature, top_p, np.random.default_rng(7))(scores) for scores in (logits, logprobs)]
        assert draws[0].tolist() == draws[1].tolist()
    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    sampler = HostSampler(0.8, 0.9, np.random.default_rng(0))
    rows = decode(LeanBatchGenerator, model, prompts, samplers=[None, sampler, sampler])
    assert not any(normalized(s) for _, scores in rows for s in scores[2:])


def test_an_mlx_lm_without_the_expected_batch_keeps_its_own_step(bundled, monkeypatch):
    from mlx_lm.generate import GenerationBatch

    from models.mlx_lm_ext import batch_generator as decode_batch

    monkeypatch.setattr(decode_batch, "GENERATION_BATCH_ATTRIBUTES",
                        (*decode_batch.GENERATION_BATCH_ATTRIBUTES, "_renamed_in_a_later_mlx_lm"))
    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    gen = LeanBatchGenerator(model, max_tokens=4)
    assert type(gen._generation_batch) is GenerationBatch
    rows = decode(LeanBatchGenerator, model, prompts, tokens=6)
    assert [t for t, _ in rows] == [t for t, _ in decode(BatchGenerator, model, prompts, tokens=6)]
    assert all(normalized(s) for _, scores in rows for s in scores)


class Poisoned:
    """The model, with +inf logits from its `poison_from`-th call on (prefill calls count)."""

    def __init__(self, model, poison_from: int) -> None:
        self.model, self.poison_from, self.calls = model, poison_from, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        self.calls += 1
        logits = self.model(inputs, cache=cache, **kwargs)
        return logits + mx.inf if self.calls >= self.poison_from else logits


def finite_flags(model, prompts, tokens: int, check_every: int) -> list[list[bool]]:
    """Each row's `finite` per response of a LeanBatchGenerator."""
    gen = LeanBatchGenerator(model, max_tokens=tokens, completion_batch_size=8, prefill_batch_size=8,
                             check_every=check_every)
    uids = gen.insert(prompts, max_tokens=[tokens] * len(prompts))
    flags: dict[int, list[bool]] = {uid: [] for uid in uids}
    while sum(len(f) for f in flags.values()) < tokens * len(uids):
        for r in gen.next_generated():
            flags[r.uid].append(r.finite)
    return [flags[uid] for uid in uids]


def test_the_step_checks_the_picked_scores_every_few_steps_first_and_last(bundled):
    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    assert finite_flags(model, prompts, 10, 1) == [[True] * 10] * 3  # nothing to flag
    assert finite_flags(Poisoned(model, 1), prompts, 10, 1) == [[False] * 10] * 3  # every step checked
    for row in finite_flags(Poisoned(model, 1), prompts, 10, 4):
        # every 4th step (not the others), and the first and last token of each row
        assert row[0] is False and row[-1] is False
        assert 4 <= row.count(False) <= 6
        assert all(True in row[i:i + 4] for i in range(1, 6))  # unchecked steps say True
    # poisoned from a decode step on: the flags turn at that step, and no earlier
    for row in finite_flags(Poisoned(model, 6), prompts, 10, 1):
        turn = row.index(False)
        assert 0 < turn and row[turn:] == [False] * (len(row) - turn)


def test_the_lone_stream_checks_on_the_same_schedule(bundled):
    from models.decode.single_stream import SingleStream

    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompt = tokenizer.encode(PROMPTS[0])

    def flags(m, check_every):
        stream = SingleStream(m, prompt, 10, None, [], set(), uid=-1, check_every=check_every)
        return [stream.step().finite for _ in range(10)]

    assert flags(model, 4) == [True] * 10
    assert flags(Poisoned(model, 1), 1) == [False] * 10
    # checked: the first token, every 4th, and the last; unchecked tokens say finite
    assert [not f for f in flags(Poisoned(model, 1), 4)] == [i % 4 == 0 or i == 9 for i in range(10)]


def finished_rows(model, prompts, max_tokens):
    """Run a batch to its end: each finished response, and whether the step that returned it queued another."""
    gen = LeanBatchGenerator(model, max_tokens=max(max_tokens), completion_batch_size=8, prefill_batch_size=8,
                             reads_logprobs=lambda uid: False)
    gen.insert(prompts, max_tokens=max_tokens)
    finished = []
    while len(finished) < len(prompts):
        for r in gen.next_generated():
            if r.finish_reason is not None:
                finished.append((r, gen._generation_batch.queued_next))
    return finished


def keys_of(model, tokens):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([tokens]), cache=cache)
    return [c.keys[..., : c.offset, :] for c in cache]


def test_no_step_follows_the_one_where_every_row_ends_by_length(bundled):
    """A step nobody reads is not queued; a finished row's cache (for the prefix cache) holds the keys of
    exactly the tokens it is stored with, whether or not a step followed."""
    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    together = finished_rows(model, prompts, [7, 7, 7])
    assert [queued for _, queued in together] == [False] * 3
    apart = finished_rows(model, prompts, [5, 7, 7])  # the first row ends while the others go on
    assert [queued for _, queued in apart] == [True, False, False]
    for (r, queued), prompt in zip(together + apart, prompts + prompts, strict=True):
        generated = 5 if queued else 7
        # the prompt and the tokens whose keys were computed: all generated but the last, unless a step followed
        assert len(r.all_tokens) == len(prompt) + generated - (0 if queued else 1)
        assert r.all_tokens[: len(prompt)] == prompt
        for ours, fresh in zip([c.keys for c in r.prompt_cache], keys_of(model, r.all_tokens), strict=True):
            assert ours.shape == fresh.shape
            assert mx.allclose(ours, fresh, atol=1e-4).item()


def held_run(model, prompts, start: bool):
    """Tokens per row, and after each call whether a queued step was held back (started when `start`)."""
    gen = LeanBatchGenerator(model, max_tokens=6, completion_batch_size=8, prefill_batch_size=8,
                             reads_logprobs=lambda uid: False)
    uids = gen.insert(prompts, max_tokens=[6] * len(prompts))
    out, held = {uid: [] for uid in uids}, []
    while sum(map(len, out.values())) < 6 * len(prompts):
        responses = gen.next_generated()
        for r in responses:
            out[r.uid].append(r.token)
        if responses:
            held.append(gen.holding)
        if start:
            gen.start_held()
            assert not gen.holding
    return [out[uid] for uid in uids], held


def test_the_step_after_first_tokens_is_held_until_the_owner_starts_it(bundled):
    """Only the step queued behind rows' first tokens waits for start_held; started or not (then it runs when
    its tokens are read), the tokens are mlx-lm's."""
    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    reference = [tokens for tokens, _ in decode(BatchGenerator, model, prompts, tokens=6)]
    for start in (True, False):
        tokens, held = held_run(model, prompts, start)
        assert tokens == reference
        assert held == [True] + [False] * 5  # the last call queues nothing: every row ended


def test_the_lone_stream_holds_the_step_after_its_first_token(bundled):
    from models.decode.single_stream import SingleStream

    model, tokenizer = bundled
    model.set_dtype(mx.float32)
    prompt = tokenizer.encode(PROMPTS[0])
    runs = []
    for start in (True, False):
        stream = SingleStream(model, prompt, 6, None, [], set(), uid=-1)
        tokens, held = [], []
        for _ in range(6):
            tokens.append(stream.step().token)
            held.append(stream.holding)
            if start:
                stream.start_held()
        runs.append((tokens, held))
    assert runs[0][0] == runs[1][0]
    assert runs[1][1] == [True] + [False] * 5
