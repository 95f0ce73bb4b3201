"""Commands from rank 0 to the other ranks, and numbers gathered from every rank, over MLX collectives.

A command is a small JSON object. It travels in one `all_sum` of a fixed-size int32 frame (rank 0 writes
its bytes, the others zeros); a longer one (a long prompt's tokens) takes a second `all_sum` for the rest.
Every call blocks until all ranks take part: the watchdog (models.distributed.watchdog) times them out.
They run on mlx-lm's generation stream, the decoders' own: a step evaluated ahead (async_eval) keeps its
collectives before the next command's on every rank (on another stream the two could interleave).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

log = logging.getLogger(__name__)
FRAME_WORDS = 256  # int32 words: 4 for the length, the rest for the first bytes of the command
_INLINE = (FRAME_WORDS - 1) * 4


class GroupLostError(RuntimeError):
    """A rank stopped answering (its process died, or a collective timed out): the group cannot go on."""


class Channel:
    """One rank's end of the command channel of `group`. Rank 0 `send`s; the others `receive`."""

    def __init__(self, group: mx.distributed.Group) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.lost: str | None = None  # why the group is gone, once it is
        self.wait_since: float | None = None  # when the current collective of the channel began
        self.step_since: float | None = None  # when the current decoder step began
        # the next wait is not timed: the first (ranks start at their own pace), the first after a load
        self.patient = True
        self._lock = threading.Lock()

    def send(self, command: dict[str, Any]) -> None:
        """Rank 0: broadcast `command` to every other rank."""
        self._check()
        log.debug("send %s", str(command)[:200])
        data = np.frombuffer(json.dumps(command, separators=(",", ":")).encode(), dtype=np.uint8)
        frame = np.zeros(FRAME_WORDS * 4, dtype=np.uint8)
        frame[:4] = np.frombuffer(np.int32(len(data)).tobytes(), dtype=np.uint8)
        head = data[:_INLINE]
        frame[4:4 + len(head)] = head
        self._all_sum(frame.view(np.int32))
        if len(data) > _INLINE:
            self._all_sum(_padded(data[_INLINE:]).view(np.int32))

    def receive(self) -> dict[str, Any]:
        """A follower: the next command rank 0 sends."""
        self._check()
        frame = self._all_sum(np.zeros(FRAME_WORDS, dtype=np.int32)).view(np.uint8)
        length = int(frame[:4].view(np.int32)[0])
        data = frame[4:4 + min(length, _INLINE)].tobytes()
        if length > _INLINE:
            rest = self._all_sum(np.zeros(_padded_len(length - _INLINE) // 4, dtype=np.int32)).view(np.uint8)
            data += rest[:length - _INLINE].tobytes()
        command = json.loads(data)
        log.debug("received %s", str(command)[:200])
        return command

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (the same length on all), in rank order."""
        self._check()
        local = mx.array(np.asarray(values, dtype=np.int64).reshape(1, -1))
        with self.waiting():
            try:
                out = mx.distributed.all_gather(local, group=self.group, stream=generation_stream)
                return np.array(out).tolist()
            except RuntimeError as e:
                raise self._lose(f"gathering from the ranks failed: {e}") from None

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Marks a collective of the channel: the watchdog times it (unless `patient`: after a load)."""
        if not self.patient:
            self.wait_since = time.monotonic()
        try:
            yield
        finally:
            self.wait_since = None
            self.patient = False

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Marks a decoder step (its compute and the collectives inside the model): timed more loosely."""
        self.step_since = time.monotonic()
        try:
            yield
        finally:
            self.step_since = None

    def lose(self, reason: str) -> None:
        """The group is gone (the watchdog's verdict); every later call raises GroupLostError."""
        with self._lock:
            if self.lost is None:
                self.lost = reason

    def _all_sum(self, words: np.ndarray) -> np.ndarray:
        with self.waiting():
            try:
                return np.array(mx.distributed.all_sum(mx.array(words), group=self.group,
                                                         stream=generation_stream))
            except RuntimeError as e:  # the ring backend fails its pending work when a peer's socket closes
                raise self._lose(f"a rank left the group: {e}") from None

    def _lose(self, reason: str) -> GroupLostError:
        self.lose(reason)
        return GroupLostError(self.lost)

    def _check(self) -> None:
        if self.lost is not None:
            raise GroupLostError(self.lost)


def _padded_len(n: int) -> int:
    return (n + 3) // 4 * 4


def _padded(data: np.ndarray) -> np.ndarray:
    out = np.zeros(_padded_len(len(data)), dtype=np.uint8)
    out[:len(data)] = data
    return out
