"""A thread that times the waits on the other ranks: one that lasts past the timeout means a rank is gone."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from models.distributed.channel import Channel

log = logging.getLogger(__name__)


class Watchdog:
    """Calls `on_lost(reason)` once, when the group is lost: a collective (or a step around one) has waited
    longer than `timeout_s`, or the channel saw a rank leave. MLX's collectives cannot be interrupted, so
    the thread that waits stays blocked; `on_lost` answers for it."""

    def __init__(self, channel: Channel, timeout_s: float, on_lost: Callable[[str], None],
                 poll_s: float = 0.2) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
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
            since = channel.busy_since
            if since is not None and time.monotonic() - since > self.timeout_s:
                channel.lose(f"rank {channel.rank} waited more than {self.timeout_s:g}s for the other ranks "
                             "(one stopped or hangs)")
        log.error("distributed group lost: %s", channel.lost)
        self.on_lost(channel.lost)
