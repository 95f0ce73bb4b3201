"""Rank 0's side: before each MLX step on a model, tell the other ranks to take the same step.

The registry tells the mirror before it builds or drops a variant; `MirroredDecoder` before each decoder
call (start a lone stream, insert into the batch, a step, a hand-off, a removal); the worker, when idle,
sends a heartbeat. The followers (models.distributed.follower) replay each command on their own shards.
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx

from models.distributed.channel import Channel
from models.engine.decoder import MLXDecoder

HEARTBEAT_S = 1.0  # an idle rank 0 tells the others it is alive this often

# The request fields a follower needs to build the same sampler and logits processors (models.engine.serving)
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "logprobs", "presence_penalty", "frequency_penalty",
                   "ignore_eos")


class Mirror:
    """What rank 0 sends. Each method runs on the engine's worker thread (or after it stopped)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._beat_at = time.monotonic()

    def loading(self, key: tuple[str, str]) -> None:
        self.channel.send({"op": "load", "key": list(key)})
        self.channel.patient = True  # the next wait may be a slower rank's load

    def dropped(self, key: tuple[str, str]) -> None:
        self.channel.send({"op": "drop", "key": list(key)})

    def heartbeat(self) -> None:
        """At most every HEARTBEAT_S: proves to the followers (and to rank 0's watchdog) that all are alive."""
        if time.monotonic() - self._beat_at >= HEARTBEAT_S:
            self.channel.send({"op": "ping"})
            self._beat_at = time.monotonic()

    def memory(self, keys: list[tuple[str, str]], weights: list[int]) -> list[dict]:
        """Every rank's memory (`ranks_memory`); `weights`: rank 0's bytes of each variant of `keys`."""
        self.channel.send({"op": "memory", "keys": [list(k) for k in keys]})
        return ranks_memory(self.channel, weights)

    def stop(self) -> None:
        """Rank 0 stops: the others leave their loop."""
        if self.channel.lost is None:
            self.channel.send({"op": "stop"})


def ranks_memory(channel: Channel, weights: list[int]) -> list[dict]:
    """Each rank's MLX active, peak and cache bytes and its weight bytes per variant (`weights`: this rank's,
    in the order rank 0 named the variants), gathered from all ranks in rank order."""
    rows = channel.gather([mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory(), *weights])
    return [{"rank": rank, "active_bytes": row[0], "peak_bytes": row[1], "cache_bytes": row[2],
             "weights_bytes": row[3:]} for rank, row in enumerate(rows)]


class MirroredDecoder(MLXDecoder):
    """An MLXDecoder whose every call is first sent to the other ranks (same variant, same arguments), and
    timed by the watchdog with the collectives of the step itself."""

    channel: Channel  # set by `mirrored_decoder_class`

    def _tell(self, call: str, **fields: Any) -> None:
        self.channel.send({"op": "decoder", "key": list(self.variant.key), "call": call, **fields})

    def start_lone(self, seq: Any) -> int:
        with self.channel.stepping():
            self._tell("start_lone", seq=_replayable(seq))
            return super().start_lone(seq)

    def insert(self, seq: Any) -> int:
        with self.channel.stepping():
            self._tell("insert", seq=_replayable(seq))
            return super().insert(seq)

    def step_lone(self) -> Any:
        with self.channel.stepping():
            self._tell("step_lone")
            return super().step_lone()

    def step_batch(self, beside_lone: bool) -> list:
        with self.channel.stepping():
            self._tell("step_batch", beside_lone=beside_lone)
            return super().step_batch(beside_lone)

    def start_held(self) -> None:
        # the followers hold the same step (same calls on the same state): started in the same order of
        # collectives as here, or rank 0's would meet the next command's
        if self.holding:
            with self.channel.stepping():
                self._tell("start_held")
                super().start_held()

    def hand_off(self) -> Any:
        with self.channel.stepping():
            self._tell("hand_off")
            return super().hand_off()

    def rejoin(self, seq: Any) -> int:
        with self.channel.stepping():
            self._tell("rejoin")
            return super().rejoin(seq)

    def retire_lone(self, seq: Any) -> None:
        self._tell("retire_lone")
        super().retire_lone(seq)

    def remove(self, seq: Any) -> None:
        self._tell("remove", uid=seq.uid)
        super().remove(seq)

    def reset(self) -> None:
        self._tell("reset")
        super().reset()


def mirrored_decoder_class(channel: Channel) -> type[MirroredDecoder]:
    """MirroredDecoder bound to `channel` (models.engine.serving.Serving.decoder_class)."""
    return type("MirroredDecoder", (MirroredDecoder,), {"channel": channel})


def _replayable(seq: Any) -> dict:
    """What a follower needs to start `seq` as rank 0 does: its prompt, its length and how it samples."""
    if seq.cached_tokens:
        raise RuntimeError("a prompt cache hit in distributed mode (the prefix cache must be off)")
    params = seq.params
    fields = {name: getattr(params, name) for name in SAMPLING_FIELDS}
    fields["logit_bias"] = [list(pair) for pair in params.logit_bias]
    return {"tokens": list(seq.tokens), "max_tokens": seq.max_tokens, "params": fields}
