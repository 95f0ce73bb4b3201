"""The MLX worker's turn (models.engine.worker): the tokens a step produced are handed to their event loops
before the decode step held back behind them starts (it would keep them waiting for about half a step)."""

from __future__ import annotations

import asyncio
import threading

from models.api import TextDelta, WorkerStats
from models.engine.config import EngineConfig
from models.engine.outbox import Outbox
from models.engine.worker import PhaseClock, Stop, Traffic, Worker


class Stream:
    """What the outbox needs of a sequence."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.events, self.text_sent = loop, asyncio.Queue(), False


class RecordingHost:
    """Decodes `steps` times; each step emits one token's text, then the worker starts the held step."""

    def __init__(self, outbox: Outbox, steps: int) -> None:
        self.outbox, self.steps, self.log = outbox, steps, []
        self.done = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.seq = Stream(self.loop)

    def busy(self) -> bool:
        return self.steps > 0

    serving = busy

    def admit(self, seq, burst: bool) -> None: ...
    def admit_waiting(self) -> None: ...
    def step_report(self) -> None: ...
    def idle(self, now: float) -> None: ...
    def fail_all(self, error) -> None: ...

    def step_all(self) -> None:
        if self.steps > 0:
            self.steps -= 1
            self.outbox.items.append((self.seq, TextDelta("x")))
            self.log.append("step")

    def start_held(self) -> None:
        # what the step emitted has left the outbox by now
        self.log.append("start_held" if not self.outbox.items else "start_held before the flush")
        if self.steps == 0:
            self.done.set()


def test_the_held_step_starts_after_the_tokens_went_out():
    stats = WorkerStats()
    outbox = Outbox(stream_interval_s=0.0, stream_events_per_s=0, running=lambda: 1)
    host = RecordingHost(outbox, steps=3)
    worker = Worker(EngineConfig("m"), host, outbox, stats, PhaseClock(stats), Traffic(), on_death=lambda reason: None)
    worker.start()
    assert host.done.wait(5)
    worker.put(Stop())
    worker.thread.join(5)
    assert host.log[:6] == ["step", "start_held"] * 3
    host.loop.close()
