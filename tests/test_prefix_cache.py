"""Reuse of the KV cache of earlier requests with a shared prompt prefix: same answers, fewer
tokens prefilled, bytes reported and counted against the memory budget."""

import asyncio

from tests.test_registry import app_client, close


async def complete(client, prompt: str, **extra) -> dict:
    r = await client.post("/v1/completions", json={"model": "tiny-arith", "prompt": prompt, "max_tokens": 8,
                                                   "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


PROMPTS = ["17+25=", "17+25=", "17+2=", "The cat sat on the mat. 17+25=", "The cat sat on the mat. 3+4=", "17+25="]


async def test_a_shared_prefix_is_reused_and_answers_do_not_change():
    app, ctx, client = await app_client(prompt_cache_bytes="0")
    try:
        reference = [(await complete(client, p, max_tokens=12))["choices"][0]["text"] for p in PROMPTS]
    finally:
        await close(ctx, client)
    app, ctx, client = await app_client(prompt_cache_bytes="64MiB")
    try:
        bodies = [await complete(client, p, max_tokens=12) for p in PROMPTS]
        assert [b["choices"][0]["text"] for b in bodies] == reference
        assert reference[0] == "42"
        counts = [cached(b) for b in bodies]
        prompt_tokens = [b["usage"]["prompt_tokens"] for b in bodies]
        assert counts[0] == 0
        # All but the last prompt token (its logits start the answer) come from the cache.
        assert counts[1] == prompt_tokens[1] - 1 and counts[5] == prompt_tokens[5] - 1
        assert 0 < counts[4] < prompt_tokens[4]  # the shared 24 characters
        assert counts[2] == prompt_tokens[2] - 1  # a short prompt: all but its last token is shared
        assert counts[3] == 0  # it shares only a few tokens (under MIN_REUSE): prefilled, not copied
        native = (await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})).json()
        assert native["text"] == "42" and native["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        memory = (await client.get("/memory")).json()
        variant = memory["variants"][0]["prompt_cache"]
        assert variant["entries"] >= 1 and variant["bytes"] > 0 and variant["hits"] >= 5
        assert memory["budget"]["prompt_cache_bytes"] == variant["bytes"]
        metrics = (await client.get("/metrics")).text
        assert 'dtype_serve_prompt_cache_hit_tokens_total{dtype="bfloat16",model="tiny-arith"}' in metrics
    finally:
        await close(ctx, client)


async def test_concurrent_requests_share_prefixes_in_the_batch():
    app, ctx, client = await app_client(prompt_cache_bytes="64MiB")
    try:
        sums = [(17, 25), (12, 30), (3, 4), (17, 25), (40, 2), (9, 9)]
        for _ in range(2):  # the second round finds the first round's caches
            bodies = await asyncio.gather(*(complete(client, f"{a}+{b}=") for a, b in sums))
            assert [b["choices"][0]["text"] for b in bodies] == [str(a + b) for a, b in sums]
        assert all(cached(b) >= b["usage"]["prompt_tokens"] - 3 for b in bodies)
        # the batch path ran (requests arriving together start in the batch), not only lone streams
        assert any(v.generator is not None for v in app.state.engine.registry.variants.values())
    finally:
        await close(ctx, client)


async def test_turned_off_it_caches_nothing():
    app, ctx, client = await app_client(prompt_cache_bytes="0")
    try:
        for _ in range(2):
            assert cached(await complete(client, "17+25=")) == 0
        assert (await client.get("/memory")).json()["budget"]["prompt_cache_bytes"] == 0
    finally:
        await close(ctx, client)


async def test_cached_prompts_are_dropped_before_a_load_is_refused():
    estimate = None
    app, ctx, client = await app_client(prompt_cache_bytes="64MiB")
    try:
        estimate = (await client.get("/memory/estimate", params={"dtype": "float32"})).json()["estimates"][0]
        resident = (await client.get("/memory")).json()["budget"]["used_bytes"]
    finally:
        await close(ctx, client)
    # Room for the default variant, a float32 one and its request's KV cache (buffers of 256 positions of
    # 4 KiB), not for the cached prompts besides (three of 200 tokens and more, 2 KiB each in bfloat16).
    room = 4096 + 256 * 4096
    budget = resident + estimate["total_bytes"] + room
    app, ctx, client = await app_client(prompt_cache_bytes="64MiB", memory_budget=str(budget))
    try:
        for prompt in ("17+25=", "The cat sat on the mat", "12+30="):
            await complete(client, f"{prompt} " * (200 // len(prompt)))
        assert (await client.get("/memory")).json()["budget"]["prompt_cache_bytes"] > room
        r = await client.post("/models/load", json={"model": "tiny-arith", "dtype": "float32"})
        assert r.status_code == 200, r.text
        budget_report = (await client.get("/memory")).json()["budget"]
        assert budget_report["prompt_cache_bytes"] == 0
        assert budget_report["used_bytes"] <= budget
        assert (await complete(client, "17+25=", dtype="float32"))["choices"][0]["text"] == "42"
    finally:
        await close(ctx, client)



def test_a_stored_batch_row_holds_its_own_bytes_not_the_batchs():
    """A row extracted from a batch (mlx-lm's extract: a lazy copy) is evaluated when stored, so the batch's
    buffers go when the batch does: MLX's active memory then holds what the prompt cache counts."""
    import gc

    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    from models.decode.prefix_cache import PrefixCache

    gc.collect()
    before = mx.get_active_memory()
    batch = BatchKVCache([0] * 8)
    batch.update_and_fetch(mx.ones((8, 4, 1000, 64)), mx.ones((8, 4, 1000, 64)))  # 8 rows of 1,000: 16 MB
    mx.eval(batch.keys, batch.values)
    prefix = PrefixCache(64 * 2**20)
    prefix.store(list(range(1000)), [batch.extract(0)])
    del batch
    gc.collect()
    held = mx.get_active_memory() - before
    assert prefix.nbytes == 2 * 4 * 1000 * 64 * 4  # one row's keys and values, float32
    assert held < 2 * prefix.nbytes, (held, prefix.nbytes)  # not the batch's 16 MB
