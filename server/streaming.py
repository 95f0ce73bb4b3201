"""Consuming the engine's event stream from a route: early errors, disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from models.api import Finished, Started, TextDelta, TokenLogprob

Events = AsyncIterator[Started | TextDelta | Finished]


class ClientDisconnected(Exception):
    """The client left before the response was ready; its generation was cancelled."""


async def first_event(events: Events) -> Started:
    """Wait until the request is admitted, so errors before any token get a real HTTP status."""
    try:
        event = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    assert isinstance(event, Started)
    return event


async def collect(events: Events) -> tuple[str, list[TokenLogprob], Finished]:
    parts: list[str] = []
    entries: list[TokenLogprob] = []
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                entries.extend(event.logprobs)
            elif isinstance(event, Finished):
                return "".join(parts), entries, event
    finally:
        await events.aclose()
    raise RuntimeError("the event stream ended without a Finished event")


async def collect_unless_disconnected(request: Request, events: Events,
                                      poll_s: float = 0.05) -> tuple[str, list[TokenLogprob], Finished]:
    """Collect a whole generation; if the client disconnects meanwhile, cancel it at once."""
    task = asyncio.create_task(collect(events))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
