"""The memory budget covers the live KV caches and the growth promised to running sequences: on a small
budget, long-context requests start only while their KV cache (prompt + max_tokens tokens) fits, the rest
wait and then complete with the tokens they would have had alone, or are refused with a clear message
(429 once the queue is full, 400 for a request that could never fit); MLX's active memory stays within the
budget plus a stated slack, and nothing is lost."""

from __future__ import annotations

import asyncio
import gc

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from prometheus_client.parser import text_string_to_metric_families

from models.weights.estimate import estimate_variant
from tests.conftest import BUNDLED
from tests.test_registry import app_client, close

DTYPE = "float32"  # float32: the batch's tokens equal a lone stream's (no rounding ties)
PER_TOKEN = 4 * 2 * 4 * 32 * 4  # the bundled model's KV bytes per token: layers x (K, V) x heads x dims x 4 bytes
CACHE_STEP = 256  # mlx-lm's caches grow in steps of this many tokens: the reservations count them
# What the budget does not govern: decode temporaries, sampler and mask arrays (between steps, MLX's active memory
# was at most 0.9 MB above the budget in 12 runs)
SLACK_BYTES = 3 * 1024 * 1024 // 2


def arithmetic(first: int, length: int) -> str:
    """A prompt of `length` characters (one token each, after <bos>) of sums the bundled model knows."""
    text, i = "", first
    while len(text) < length:
        text += f"{i}+{i % 7}={i + i % 7}\n"
        i += 1
    return text[:length]


def weights_bytes() -> int:
    return estimate_variant(BUNDLED, DTYPE)["total_bytes"]


def greedy(model, tokenizer, prompts: list[str], max_tokens: int) -> list[str]:
    """The prompts' greedy completions on mlx-lm's plain KV cache, ignoring end-of-sequence: prompts of one
    length, decoded side by side (no padding: each row is its own computation)."""
    cache = make_prompt_cache(model)
    tokens, out = mx.array([tokenizer.encode(p) for p in prompts]), []
    for _ in range(max_tokens):
        tokens = mx.argmax(model(tokens, cache=cache)[:, -1:], axis=-1)
        mx.eval(tokens)
        out.append(tokens)
    return [tokenizer.decode(row) for row in mx.concatenate(out, axis=1).tolist()]


async def test_long_requests_wait_for_kv_room_complete_and_stay_within_the_budget():
    # 151 tokens with <bos>: 175 tokens of KV each, in buffers of 256 x 4 KiB. A row that joins the batch behind
    # its rows (at most max_tokens) is padded within those 256: the padding the reservation does not foresee
    # (models.decode.kv_usage) cannot take a row to a second step, so the budget holds exactly.
    prompt_len, max_tokens = 150, 24
    need = CACHE_STEP * PER_TOKEN
    budget = weights_bytes() + 3 * need + need // 2  # three at once; max_batch_size would allow four
    baseline = mx.get_active_memory()  # this process's arrays before the server (other tests' leftovers)
    app, ctx, client = await app_client(dtype=DTYPE, memory_budget=str(budget), max_batch_size=4, max_queue=4,
                                        prompt_cache_bytes="4MiB")
    prompts = [arithmetic(40 * i, prompt_len) for i in range(10)]
    await app.state.engine._call(mx.reset_peak_memory)
    samples: list[dict] = []
    exported: list[dict] = []  # /metrics' KV budget figures, summed over variants
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            samples.append((await client.get("/memory")).json())
            if len(samples) % 4:
                await asyncio.sleep(0.01)
                continue
            families = text_string_to_metric_families((await client.get("/metrics")).text)
            exported.append({s.name: s.value for f in families for s in f.samples
                             if s.name in ("dtype_serve_kv_cache_reserved_bytes", "dtype_serve_kv_waiting_requests")})
            await asyncio.sleep(0.01)

    async def complete(prompt: str):
        return await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0, "ignore_eos": True})

    try:
        watcher = asyncio.create_task(watch())
        responses = await asyncio.gather(*(complete(p) for p in prompts))
        done.set()
        await watcher
        final = (await client.get("/memory")).json()
        engine = app.state.engine
        loaded = (await engine._call(lambda: engine.registry.get(engine.default_model, DTYPE))).loaded
        accepted = [p for p, r in zip(prompts, responses, strict=True) if r.status_code == 200]
        expected = await engine._call(lambda: greedy(loaded.model, loaded.tokenizer, accepted, max_tokens))
    finally:
        await close(ctx, client)

    ok = [(p, r) for p, r in zip(prompts, responses, strict=True) if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    # capacity is max_batch_size + max_queue = 8 open requests: the last two are refused at once, and retryable
    assert len(ok) == 8 and len(refused) == 2
    for r in refused:
        assert r.status_code == 429 and r.headers["Retry-After"] and "capacity" in r.json()["error"]["message"]
    # the budget, not max_batch_size, bounded the running requests; the others waited
    running = [sum(v["in_flight"] for v in s["variants"]) for s in samples]
    waiting = [s["budget"]["waiting_for_kv"] for s in samples]
    assert max(running) == 3 and max(waiting) > 0
    assert max(e["dtype_serve_kv_waiting_requests"] for e in exported) > 0
    # exported; mostly 0 here: a row's first buffer step (256 positions) holds all its 175 tokens once prefilled
    assert all(e["dtype_serve_kv_cache_reserved_bytes"] >= 0 for e in exported)
    for s in samples:
        b = s["budget"]
        assert b["used_bytes"] + b["kv_cache_reserved_bytes"] <= budget
        live = sum(v["kv_cache"]["live_bytes"] for v in s["variants"])
        assert live == b["kv_cache_live_bytes"]
    # MLX's own figure: the budget, plus slack
    most_active = max(s["process"]["active_bytes"] for s in samples) - baseline
    assert most_active <= budget + SLACK_BYTES, (most_active, budget)
    # every accepted request gave the tokens mlx-lm gives it alone; nothing stayed behind
    assert all(expected) and [r.json()["choices"][0]["text"] for _, r in ok] == expected
    assert all(r.json()["usage"]["completion_tokens"] == max_tokens for _, r in ok)
    assert final["budget"]["waiting_for_kv"] == 0 and final["budget"]["kv_cache_reserved_bytes"] == 0
    assert final["budget"]["kv_cache_live_bytes"] == 0
    gc.collect()


async def test_a_request_that_could_never_fit_is_a_clear_400_naming_why():
    room = 512 * 1024  # beside the weights: 128 tokens of KV, less than one step of the buffers (256)
    app, ctx, client = await app_client(dtype=DTYPE, memory_budget=str(weights_bytes() + room))
    try:
        budget = (await client.get("/memory")).json()["budget"]
        most = budget["budget_bytes"] - budget["weights_bytes"]
        prompt = arithmetic(0, 19)  # 20 tokens with <bos>
        for max_tokens in (200, 1):
            r = await client.post("/v1/completions",
                                  json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "kv_budget_exceeded" and "memory budget" in error["message"]
            assert error["required_bytes"] == CACHE_STEP * PER_TOKEN and error["available_bytes"] == most
            assert error["max_tokens_fitting"] == 0 and "not even one step of 256 positions" in error["message"]
            assert "Traceback" not in r.text
        r = await client.post("/v1/completions", json={"prompt": prompt, "temperature": 0})
        assert r.status_code == 400, r.text  # the default max_tokens is bounded by the room, which holds none
    finally:
        await close(ctx, client)


async def test_one_step_of_room_runs_one_request_at_a_time_and_a_left_one_never_runs():
    room = 3 * CACHE_STEP * PER_TOKEN // 2  # one request's buffers (every one here: the context is 256), not two
    app, ctx, client = await app_client(dtype=DTYPE, memory_budget=str(weights_bytes() + room))
    try:
        body = {"prompt": arithmetic(0, 19), "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        first = asyncio.create_task(client.post("/v1/completions", json=body))
        second = asyncio.create_task(client.post("/v1/completions", json=body))
        for _ in range(500):
            budget = (await client.get("/memory")).json()["budget"]
            if budget["waiting_for_kv"]:
                break
            await asyncio.sleep(0.01)
        assert budget["waiting_for_kv"] == 1 and budget["kv_cache_reserved_bytes"] + budget["kv_cache_live_bytes"] > 0
        second.cancel()  # its client leaving takes it out of the queue, unstarted
        third = await client.post("/v1/completions", json=body)
        assert (await first).status_code == 200 and third.status_code == 200
        assert third.json()["usage"]["completion_tokens"] == 100
        memory = (await client.get("/memory")).json()
        assert memory["budget"]["waiting_for_kv"] == 0
        assert sum(v["requests_served"] for v in memory["variants"]) == 2  # the left one never ran
    finally:
        await close(ctx, client)
