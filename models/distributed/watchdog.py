"""A thread that times the waits on the other ranks: one that lasts past the timeout means a rank is gone."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from models.distributed.channel import Channel

log = logging.getLogger(__name__)
STEP_TIMEOUTS = 10  # by default a decoder step may take this many timeouts (a long prefill) before the group is lost


class Watchdog:
    """Calls `on_lost(reason)` once, when the group is lost: a command's collective waited longer than
    `timeout_s` (the ranks reach each command within about the time of the step before it), a decoder step
    took longer than `step_timeout_s` (default: STEP_TIMEOUTS waits; a forward pass whose collectives never
    complete), or the channel saw a rank leave. MLX's collectives cannot be interrupted: the thread that
    waits stays blocked, and `on_lost` answers for it."""

    def __init__(self, channel: Channel, timeout_s: float, on_lost: Callable[[str], None],
                 poll_s: float = 0.2, step_timeout_s: float | None = None) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self.step_timeout_s = step_timeout_s or timeout_s * STEP_TIMEOUTS
        self.on_lost = on_lost
        self.poll_s = poll_s
        self.thread = threading.Thread(target=self._run, name="distributed-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.thread.start()
        return self

    def _run(self) -> None:
        channel = self.channel
        while channel.lost is None:
            time.sleep(self.poll_s)
            now, wait, step = time.monotonic(), channel.wait_since, channel.step_since
            if wait is not None and now - wait > self.timeout_s:
                channel.lose(f"rank {channel.rank} waited more than {self.timeout_s:g}s for the other ranks "
                             "(one stopped or hangs)")
            elif step is not None and now - step > self.step_timeout_s:
                channel.lose(f"a decoder step on rank {channel.rank} took more than {self.step_timeout_s:g}s "
                             "(a rank stopped or hangs)")
        log.error("distributed group lost: %s", channel.lost)
        self.on_lost(channel.lost)
