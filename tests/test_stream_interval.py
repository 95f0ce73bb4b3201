"""Streamed text goes out merged at most once per stream interval: fewer chunks, same text."""

import asyncio
import json
import time

from tests.test_registry import app_client, close


async def streamed_chunks(client, max_tokens: int, prompt: str = "The cat") -> list[str]:
    body = {"prompt": prompt, "stream": True, "max_tokens": max_tokens, "ignore_eos": True}
    async with client.stream("POST", "/generate", json=body) as r:
        lines = [x async for x in r.aiter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
    return [json.loads(x[6:])["text"] for x in lines][:-1]  # the last event is the summary


async def test_the_stream_interval_merges_deltas_and_loses_nothing():
    app, ctx, client = await app_client(stream_interval_s=0, stream_events_per_s=0)
    try:
        every_token = await streamed_chunks(client, 120)
    finally:
        await close(ctx, client)
    app, ctx, client = await app_client(stream_interval_s=0.2)
    try:
        began = time.monotonic()
        merged = await streamed_chunks(client, 120)
        elapsed = time.monotonic() - began
    finally:
        await close(ctx, client)
    assert "".join(merged) == "".join(every_token)
    assert len(merged[0]) <= 2  # the first text is not held back
    # at most one chunk per interval after the first (a slow reader merges more, never fewer)
    assert len(merged) <= 2 + elapsed / 0.2


async def test_many_streams_share_a_cap_on_events_per_second():
    """4 streams and a cap of 40 events/s: each stream's deltas wait ~0.1 s, whatever the interval."""
    prompts = ["The cat", "A dog", "17+25=", "One two"]
    app, ctx, client = await app_client(stream_interval_s=0, stream_events_per_s=0)
    try:
        alone = [await streamed_chunks(client, 100, p) for p in prompts]
    finally:
        await close(ctx, client)
    app, ctx, client = await app_client(stream_interval_s=0, stream_events_per_s=40)
    try:
        capped = await asyncio.gather(*(streamed_chunks(client, 100, p) for p in prompts))
    finally:
        await close(ctx, client)
    for each, merged in zip(alone, capped, strict=True):
        assert "".join(merged) == "".join(each)  # nothing lost, nothing reordered
        assert len(merged) < len(each) / 2
