"""The outbox: events the worker produced, merged per request, paced, and handed to their event loops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from models.api import TextDelta


class Outbox:
    """Sequences append (sequence, event) pairs to `items` (a plain list: one append per event on the hot
    path); `flush` delivers them. Text deltas wait up to the stream interval and go out merged: one
    event-loop wake-up (and one SSE chunk) per stream per interval instead of per token."""

    def __init__(self, stream_interval_s: float, stream_events_per_s: float, running: Callable[[], int]) -> None:
        """`running()`: how many requests decode now (the events-per-second cap divides among them)."""
        self.items: list[tuple[Any, Any]] = []
        self.stream_interval_s = stream_interval_s
        # ...and with many streams the interval grows so that all of them together get at most this many
        # text events per second: the event loop's work per event competes with decoding for the GIL.
        self.stream_events_per_s = stream_events_per_s
        self._running = running
        self._last_flush = 0.0

    def flush(self, force: bool = False) -> None:
        """Hand the pending events to their event loops: one wake-up per loop, deltas of one sequence
        merged. Only deltas after a sequence's first text may wait, for the stream interval."""
        if not self.items:
            return
        now = time.perf_counter()
        if not force and now - self._last_flush < self.interval() and all(
                isinstance(event, TextDelta) and seq.text_sent for seq, event in self.items):
            return
        self._last_flush = now
        merged: dict[Any, list] = {}
        for seq, event in self.items:
            events = merged.setdefault(seq, [])
            if events and isinstance(event, TextDelta) and isinstance(events[-1], TextDelta):
                events[-1] = events[-1].then(event)
            else:
                events.append(event)
            seq.text_sent = seq.text_sent or isinstance(event, TextDelta)
        self.items.clear()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, events in merged.items():
            by_loop.setdefault(seq.loop, []).extend((seq.events, event) for event in events)
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # that loop is closed: nobody is waiting
                pass

    def interval(self) -> float:
        """The stream interval, lengthened where the running requests would exceed the event cap."""
        if self.stream_events_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, self._running() / self.stream_events_per_s)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for events, event in items:
        events.put_nowait(event)
