"""The KV cache counted (models.decode.kv_usage) and its precision per variant (`q4+kv8`): /memory's
figures are the cache arrays' nbytes exactly, for the lone stream and the batch, float and quantized;
/metrics exports them; /memory/estimate gives the per-token cost the arrays really take; variants that
differ only in KV precision share one copy of the weights; the served batch at 4-bit KV decodes
mlx-lm's QuantizedKVCache tokens."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache
from prometheus_client.parser import text_string_to_metric_families

from models.api import GenerationParams, TextDelta
from models.decode.kv_usage import kv_growth, promised_growth
from tests.conftest import BUNDLED
from tests.test_registry import app_client, close

MODEL = "tiny-arith"
PROMPTS = ["12+30=", "The dog ran", "7+7=", "A quick brown fox jumps over the lazy dog and"]


@pytest.fixture(scope="module")
async def served():
    app, ctx, client = await app_client(max_batch_size=4)
    yield app.state.engine, client
    await close(ctx, client)


def arrays_nbytes(layers) -> int:
    """The bytes of a cache list's key and value arrays, counted here independently of the engine."""
    return sum(a.nbytes for c in layers for _, a in tree_flatten([c.keys, c.values]) if isinstance(a, mx.array))


def tally(variant) -> dict:
    """On the worker: the bytes of every cache array the variant's sequences hold, and how many sequences."""
    total, rows = 0, 0
    single = variant.scheduler.decoder.single if variant.scheduler is not None else None
    if single is not None:
        total, rows = arrays_nbytes(single.cache), 1
    gen = variant.generator
    if gen is not None:
        for queued in gen._unprocessed_sequences:
            total, rows = total + arrays_nbytes(queued[3]), rows + 1
        for batch in (gen._prompt_batch, gen._generation_batch):
            total, rows = total + arrays_nbytes(batch.prompt_cache or []), rows + len(batch.uids)
    return {"bytes": total, "rows": rows}


async def started(engine, dtype: str, prompts: list[str], max_tokens: int = 200):
    """Requests decoding (each has sent text) and the tasks that drain them."""
    release = asyncio.Event()

    async def run(prompt: str, first: asyncio.Event) -> str:
        text = ""
        async for event in engine.generate(GenerationParams(prompt=prompt, model=MODEL, dtype=dtype,
                                                            max_tokens=max_tokens, ignore_eos=True)):
            if isinstance(event, TextDelta):
                text += event.text
                first.set()
                await release.wait()
        return text

    firsts = [asyncio.Event() for _ in prompts]
    tasks = [asyncio.create_task(run(p, f)) for p, f in zip(prompts, firsts, strict=True)]
    await asyncio.gather(*(f.wait() for f in firsts))
    return release, tasks


async def snapshot(engine, dtype: str) -> tuple[dict, dict]:
    """The variant's /memory entry and the independent tally, at one instant of the worker."""
    def both():
        variant = engine.registry.get(MODEL, dtype)
        # the only variant decoding: the budget's total is its figure
        return {**variant.describe()["kv_cache"], "all_variants": engine.registry.kv_cache_live()}, tally(variant)
    return await engine._call(both)


@pytest.mark.parametrize("dtype,bits", [("bfloat16", None), ("bfloat16+kv8", 8), ("bfloat16+kv4", 4)])
async def test_memory_counts_the_live_kv_caches_exactly(served, dtype, bits):
    engine, client = served
    release, tasks = await started(engine, dtype, PROMPTS[:1])  # a lone stream
    lone, lone_tally = await snapshot(engine, dtype)
    more_release, more = await started(engine, dtype, PROMPTS[1:])  # three more: all four in the batch
    batched, batch_tally = await snapshot(engine, dtype)
    release.set()
    more_release.set()
    texts = await asyncio.gather(*tasks, *more)
    assert all(texts)
    for figures, counted in ((lone, lone_tally), (batched, batch_tally)):
        assert figures["live_bytes"] == counted["bytes"] == figures["all_variants"] > 0
        assert sum(s["bytes"] for s in figures["sequences"]) == figures["live_bytes"]
        assert len(figures["sequences"]) == counted["rows"]
    assert [s["stage"] for s in lone["sequences"]] == ["lone"]
    assert len(batched["sequences"]) == 4  # the lone one may be queued in the batch by its hand-off
    assert {s["stage"] for s in batched["sequences"]} <= {"decode", "prefill", "queued", "lone"}
    assert all(s["tokens"] > len(p) for s, p in zip(lone["sequences"], PROMPTS[:1], strict=True))
    assert lone["bits"] == bits and lone["dtype"] == (f"kv{bits}" if bits else "float")
    idle = (await client.get("/memory")).json()
    variant = next(v for v in idle["variants"] if v["dtype"] == dtype)
    assert variant["kv_cache"]["live_bytes"] == 0 and variant["kv_cache"]["sequences"] == []
    assert idle["budget"]["kv_cache_live_bytes"] == 0


async def test_kv_bits_shrink_the_cost_per_token_and_metrics_export_it(served):
    engine, client = served
    for dtype in ("bfloat16", "bfloat16+kv8", "bfloat16+kv4"):
        assert (await client.post("/generate", json={"prompt": "1+1=", "model": MODEL, "dtype": dtype,
                                                     "max_tokens": 2})).status_code == 200
    memory = {v["dtype"]: v for v in (await client.get("/memory")).json()["variants"]}
    per_token = {d: memory[d]["kv_cache"]["bytes_per_token"] for d in ("bfloat16", "bfloat16+kv8", "bfloat16+kv4")}
    # 4 layers x 4 KV heads x 32 dims, keys and values: bfloat16, or codes plus a bfloat16 scale and bias per 32
    assert per_token == {"bfloat16": 2048, "bfloat16+kv8": 1152, "bfloat16+kv4": 640}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families((await client.get("/metrics")).text)
               for s in family.samples}
    for dtype, cost in per_token.items():
        labels = (("dtype", dtype), ("model", MODEL))
        assert samples[("dtype_serve_kv_cache_bytes_per_token", labels)] == cost
        assert samples[("dtype_serve_kv_cache_bytes", labels)] == memory[dtype]["kv_cache"]["live_bytes"]
    # one resident copy of the weights for the three KV precisions
    budget = (await client.get("/memory")).json()["budget"]
    assert budget["used_bytes"] - budget["prompt_cache_bytes"] == memory["bfloat16"]["total_bytes"]


async def test_the_estimate_gives_the_kv_cost_the_arrays_take(served):
    engine, client = served
    r = await client.get("/memory/estimate", params={"model": MODEL, "dtype": "bfloat16+kv4"})
    assert r.status_code == 200, r.text
    (estimate,) = r.json()["estimates"]
    kv = estimate["kv_cache"]
    assert estimate["dtype"] == "bfloat16+kv4" and kv["sequences"] == 4 and kv["context"] == 256
    assert kv["bytes"] == kv["bytes_per_token"] * 4 * 256
    model, tokenizer = load(str(BUNDLED))
    cache = [QuantizedKVCache(group_size=kv["group_size"], bits=4) for _ in make_prompt_cache(model)]
    model(mx.zeros((1, QuantizedKVCache.step), mx.int32), cache=cache)  # a whole step: no room left over
    mx.eval([c.state for c in cache])
    assert arrays_nbytes(cache) == kv["bytes_per_token"] * QuantizedKVCache.step
    default = (await client.get("/memory/estimate", params={"model": MODEL})).json()["estimates"]
    assert all(e["kv_cache"]["dtype"] == "float" and "+" not in e["dtype"] for e in default)


async def test_an_unknown_kv_precision_is_a_clear_422(served):
    _, client = served
    for body in ({"model": MODEL, "dtype": "q4+kv3"}, {"model": f"{MODEL}:q4+kv3"}):
        r = await client.post("/v1/completions", json={**body, "prompt": "1+1="})
        assert r.status_code in (404, 422), r.text
        assert "Traceback" not in r.text and "error" in r.json()


def rooms(variant) -> dict[int, tuple[int, int]]:
    """On the worker: each decoding sequence's (buffer positions, left padding), read from the cache arrays."""
    def positions(layer) -> int:
        keys = layer.keys[0] if isinstance(layer.keys, (tuple, list)) else layer.keys
        return keys.shape[2]

    out = {}
    single = variant.scheduler.decoder.single if variant.scheduler is not None else None
    if single is not None:
        out[single.uid] = (positions(single.cache[0]), 0)
    batch = variant.generator._generation_batch if variant.generator is not None else None
    if batch is not None and batch.uids:
        first = batch.prompt_cache[0]
        out |= {uid: (positions(first), p) for uid, p in zip(batch.uids, first.left_padding.tolist(), strict=True)}
    return out


async def test_admission_accounting_counts_a_requests_growth_and_the_promised(served):
    from models.mlx_lm_ext.kv_usage import grown_room

    engine, _ = served
    release, tasks = await started(engine, "bfloat16+kv8", PROMPTS[:2], max_tokens=150)

    def figures():
        variant = engine.registry.get(MODEL, "bfloat16+kv8")
        targets = {uid: job.prompt_tokens + job.params.max_tokens for uid, job in variant.jobs.items()}
        kv = variant.describe()["kv_cache"]
        held = sum(s["tokens"] for s in kv["sequences"])
        now = rooms(variant)
        if set(targets) - set(now):  # a row between the lone stream and the batch (joining): look again
            return None
        expected = sum(grown_room(now[uid][0], now[uid][1] + t) - now[uid][0] for uid, t in targets.items())
        return ((kv_growth(variant, 10, 20), kv_growth(variant, 10, 246), kv_growth(variant, 10, 247)),
                promised_growth(variant, targets),
                sum(targets.values()) - held, expected * 1152, now, kv["reserved_bytes"],
                engine.registry.kv_cache_reserved())

    for _ in range(1000):
        figured = await engine._call(figures)
        if figured is not None:
            break
        await asyncio.sleep(0.01)
    growth, promised, tokens_left, expected, now, reserved, all_reserved = figured
    release.set()
    await asyncio.gather(*tasks)
    assert growth == (256 * 1152, 256 * 1152, 512 * 1152)  # the buffers' steps: 30 tokens take 256 as 256 do
    assert len(now) == 2 and promised == expected and 0 < tokens_left < 2 * 150
    # both decode in buffers of 256 positions, room for all their tokens: nothing more to promise
    assert all(room == 256 for room, _ in now.values()) and promised == 0
    assert reserved == all_reserved == promised  # /memory's reserved bytes are the promised growth


def reference(model, tokens: list[int], bits: int, count: int) -> list[int]:
    steps = generate_step(mx.array(tokens), model, max_tokens=count, kv_bits=bits, kv_group_size=32,
                          quantized_kv_start=0)
    return [int(t) for (t, _), _ in zip(steps, range(count), strict=False)]


async def test_the_served_batch_at_4_bit_kv_gives_mlx_lms_quantized_tokens(served):
    engine, client = served
    model, tokenizer = load(str(BUNDLED))
    model.set_dtype(mx.float32)  # no ties for the batch's rounding to break the other way
    expected = [tokenizer.decode(reference(model, tokenizer.encode(p), 4, 16)) for p in PROMPTS]
    handoffs = engine.stats.handoffs

    async def complete(prompt: str) -> dict:
        r = await client.post("/v1/completions", json={"model": f"{MODEL}:float32+kv4", "prompt": prompt,
                                                       "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()

    bodies = await asyncio.gather(*(complete(p) for p in PROMPTS))
    assert [b["choices"][0]["text"] for b in bodies] == expected
    assert all(b["model"] == f"{MODEL}:float32+kv4" for b in bodies)
    assert engine.stats.handoffs >= handoffs
