"""A lone request decodes on its own; requests that arrive meanwhile are prefilled in the batch, and
the lone one joins them once they decode (or at once when the batch has no room for both)."""

import asyncio
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_registry import app_client, close


def slow_gaps(app) -> None:
    """Requests up to 0.5 s apart count as one burst (the gather gap, a tuning constant)."""
    worker = app.state.engine.worker
    worker.config = replace(worker.config, gather_gap_s=0.5)


async def generate(client, **body):
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def later(client, body, delay):
    await asyncio.sleep(delay)
    return await generate(client, **body)


@pytest.mark.parametrize("max_batch_size", [2, 8])  # 2: the third arrival finds no room for the lone stream
async def test_arrivals_during_a_lone_stream_change_no_output(max_batch_size):
    app, ctx, client = await app_client(max_batch_size=max_batch_size, max_queue=8)
    try:
        engine = app.state.engine
        long = {"prompt": "The dog", "dtype": "float32", "max_tokens": 200, "ignore_eos": True}
        sums = [{"prompt": f"{a}+{a + 4}=", "dtype": "float32", "max_tokens": 6} for a in (12, 31, 47)]
        alone = (await generate(client, **long))["text"]
        expected = [(await generate(client, **s))["text"] for s in sums]
        handoffs = engine.stats.handoffs

        results = await asyncio.gather(generate(client, **long), *(later(client, s, 0.05) for s in sums))
        assert results[0]["text"] == alone and results[0]["usage"]["completion_tokens"] == 200
        assert [r["text"] for r in results[1:]] == expected
        assert engine.stats.handoffs == handoffs + 1  # the lone stream moved into the batch once
        memory = (await client.get("/memory")).json()
        assert all(v["in_flight"] == 0 for v in memory["variants"])
    finally:
        await close(ctx, client)


async def test_once_requests_overlap_a_burst_that_finds_the_worker_idle_starts_together():
    """The first time, a request that arrives 50 ms after another finds it decoding alone (a hand-off
    follows). Once requests have overlapped, the first of a burst waits for the rest: no lone start."""
    app, ctx, client = await app_client(max_batch_size=8, max_queue=8, gather_ms=1000)
    slow_gaps(app)  # a slow CI machine's arrivals still count
    try:
        long = {"prompt": "The dog", "dtype": "float32", "max_tokens": 100, "ignore_eos": True}
        short = {"prompt": "12+16=", "dtype": "float32", "max_tokens": 6}

        async def counters():
            text = (await client.get("/metrics")).text
            return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name in ("dtype_serve_handoffs_total", "dtype_serve_gather_waits_total",
                                  "dtype_serve_bursts_gathered_total")}

        before = await counters()
        first = await asyncio.gather(generate(client, **long), later(client, short, 0.05))
        middle = await counters()  # no overlap seen before: the long one started alone, then handed off
        assert middle["dtype_serve_handoffs_total"] == before["dtype_serve_handoffs_total"] + 1
        assert middle["dtype_serve_gather_waits_total"] == before["dtype_serve_gather_waits_total"]
        second = await asyncio.gather(generate(client, **long), later(client, short, 0.05))
        after = await counters()  # gathered: both started in the batch
        assert after["dtype_serve_handoffs_total"] == middle["dtype_serve_handoffs_total"]
        assert after["dtype_serve_bursts_gathered_total"] == middle["dtype_serve_bursts_gathered_total"] + 1
        assert [r["text"] for r in second] == [r["text"] for r in first]
    finally:
        await close(ctx, client)


async def test_a_client_sending_one_request_after_another_does_not_wait_for_a_burst():
    """After overlapping traffic, the first lone request may wait for others; the ones after it,
    each sent when the last one finished, start at once."""
    app, ctx, client = await app_client(max_batch_size=8, max_queue=8, gather_ms=1000)
    slow_gaps(app)  # a wait would be long enough to see
    try:
        engine = app.state.engine
        body = {"prompt": "12+16=", "dtype": "float32", "max_tokens": 6}
        await asyncio.gather(*(generate(client, **body) for _ in range(3)))  # requests overlap
        waits = engine.stats.gather_waits
        await generate(client, **body)
        assert engine.stats.gather_waits == waits + 1  # it might have been the first of another burst
        for _ in range(3):
            await generate(client, **body)
        assert engine.stats.gather_waits == waits + 1
    finally:
        await close(ctx, client)


async def test_a_gathered_burst_of_one_prompt_length_decodes_without_a_mask():
    """Requests that start together with prompts of one length leave no row padded, so their steps run
    without an attention mask (models.mlx_lm_ext.decode_mask); a row joining later pads the batch and brings it back."""
    app, ctx, client = await app_client(max_batch_size=8, max_queue=8, gather_ms=1000)
    slow_gaps(app)
    try:
        engine = app.state.engine
        sums = [{"prompt": f"{a}+{a + 4}=", "dtype": "float32", "max_tokens": 24, "ignore_eos": True}
                for a in (12, 31, 47)]
        await asyncio.gather(*(generate(client, **s) for s in sums))  # requests overlap: later bursts gather
        steps, unmasked = engine.stats.decode_steps, engine.stats.unmasked_steps
        await asyncio.gather(*(generate(client, **s) for s in sums))
        assert engine.stats.unmasked_steps - unmasked >= 20 and engine.stats.decode_steps - steps >= 20
        steps, unmasked = engine.stats.decode_steps, engine.stats.unmasked_steps
        slow = [{**s, "max_tokens": 200} for s in sums]  # still decoding when the late one is in
        late = {"prompt": "The dog ran", "dtype": "float32", "max_tokens": 40, "ignore_eos": True}
        results = await asyncio.gather(*(generate(client, **s) for s in slow), later(client, late, 0.1))
        assert all(r["usage"]["completion_tokens"] == 200 for r in results[:3])
        masked = (engine.stats.decode_steps - steps) - (engine.stats.unmasked_steps - unmasked)
        assert masked >= 39  # a row of another length pads the batch for its 40 tokens; none once it left
        assert engine.stats.unmasked_steps - unmasked >= 200 - 40 - 40
        text = (await client.get("/metrics")).text
        metric = next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                      if s.name == "dtype_serve_unmasked_decode_steps_total")
        assert metric == engine.stats.unmasked_steps
    finally:
        await close(ctx, client)
