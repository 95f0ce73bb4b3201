"""A rank other than 0: no HTTP, no scheduling of its own; it replays what rank 0 sends, on its shards.

Rank 0 decides everything (which variant, which sequences, when they stop); a follower only repeats
the MLX work: the same loads and drops, the same decoder calls with the same prompts and samplers, so
each forward pass meets rank 0's in the same collectives. Greedy sampling is the same on every rank
because the logits are (the sharded layers end in an all_sum); a sampled request carries rank 0's seed.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from models.api import GenerationParams, WorkerStats
from models.decode.prefill import shapes_cost
from models.distributed.channel import Channel, GroupLostError
from models.distributed.group import join_group
from models.distributed.mirror import ranks_memory
from models.distributed.watchdog import Watchdog
from models.engine.config import EngineConfig
from models.engine.decoder import MLXDecoder
from models.engine.nonfinite import NonFinitePolicy
from models.engine.serving import request_sampling
from models.errors import EngineError
from models.weights.catalog import ModelCatalog
from models.weights.registry import VariantRegistry

log = logging.getLogger(__name__)
UNBOUNDED = 1 << 62  # a follower never refuses or evicts by itself: rank 0's budget decides, and says so


@dataclass
class ReplayedSequence:
    """What MLXDecoder reads of a sequence (models.engine.sequence.Sequence), rebuilt from rank 0's command."""

    params: GenerationParams
    tokens: list[int]
    max_tokens: int
    sampler: Any = None
    processors: list = field(default_factory=list)
    prompt_cache: Any = None
    cached_tokens: int = 0
    uid: int = 0


class Follower:
    """Replays rank 0's commands on this rank's registry and decoders."""

    def __init__(self, channel: Channel, catalog: ModelCatalog, config: EngineConfig) -> None:
        self.channel = channel
        self.config = config
        self.registry = VariantRegistry(catalog, config.default_dtype, UNBOUNDED,
                                        trust_remote_code=config.trust_remote_code,
                                        kv_sequences=config.max_batch_size, kv_dtype=config.kv_dtype)
        self.registry.shard_group = channel.group
        self.pad_prefill = shapes_cost() if config.pad_prefill is None else config.pad_prefill
        self.check_every = NonFinitePolicy(config.nonfinite_policy, config.check_every).check_every
        self.stats = WorkerStats()
        self.lone_uids = itertools.count(-1, -1)  # as rank 0's Serving: one counter for all variants
        self.decoders: dict[tuple[str, str], MLXDecoder] = {}
        self.lone: dict[tuple[str, str], ReplayedSequence] = {}

    def run(self) -> int:
        """Replay until rank 0 says stop (0) or the group is lost (1)."""
        while True:
            try:
                command = self.channel.receive()
            except GroupLostError as e:
                log.error("rank %d: rank 0 is gone (%s): leaving", self.channel.rank, e)
                return 1
            op = command["op"]
            if op == "stop":
                return 0
            try:
                self.replay(op, command)
            except GroupLostError as e:
                log.error("rank %d: the group was lost (%s): leaving", self.channel.rank, e)
                return 1

    def replay(self, op: str, command: dict) -> None:
        if op == "ping":
            return
        if op == "load":
            key = tuple(command["key"])
            try:
                self.registry.get(*key)
            except EngineError as e:  # rank 0's load fails the same way: it sends nothing for this variant
                log.warning("rank %d: loading %s/%s failed: %s", self.channel.rank, *key, e)
            self.channel.patient = True  # rank 0 may still be loading
        elif op == "drop":
            key = tuple(command["key"])
            self.decoders.pop(key, None)
            self.lone.pop(key, None)
            if key in self.registry.variants:
                self.registry.drop(key)
        elif op == "memory":
            keys = [tuple(k) for k in command["keys"]]
            ranks_memory(self.channel, [self.registry.variants[k].loaded.stats.final_bytes for k in keys])
        elif op == "decoder":
            with self.channel.stepping():
                self.decode(tuple(command["key"]), command["call"], command)
        else:
            raise RuntimeError(f"unknown command from rank 0: {op!r}")

    def decode(self, key: tuple[str, str], call: str, command: dict) -> None:
        """One decoder call, as rank 0's MirroredDecoder made it; `jobs` mirrors rank 0's uids."""
        variant = self.registry.variants[key]
        decoder = self.decoders.get(key)
        if decoder is None:
            decoder = self.decoders[key] = MLXDecoder(
                variant, self.lone_uids, max_batch_size=self.config.max_batch_size, pad_prefill=self.pad_prefill,
                check_every=self.check_every, stats=self.stats)
        jobs = variant.jobs
        if call == "start_lone":
            seq = self.lone[key] = _sequence(command["seq"])
            seq.uid = decoder.start_lone(seq)
            jobs[seq.uid] = seq
        elif call == "insert":
            seq = _sequence(command["seq"])
            seq.uid = decoder.insert(seq)
            jobs[seq.uid] = seq
        elif call == "step_lone":
            decoder.step_lone()
        elif call == "step_batch":
            for response in decoder.step_batch(command["beside_lone"]):
                if response.finish_reason is not None:
                    jobs.pop(response.uid, None)
        elif call == "start_held":
            decoder.start_held()
        elif call == "hand_off":
            jobs.pop(self.lone[key].uid, None)
            decoder.hand_off()
        elif call == "rejoin":
            seq = self.lone.pop(key)
            seq.uid = decoder.rejoin(seq)
            jobs[seq.uid] = seq
        elif call == "retire_lone":
            seq = self.lone.pop(key)
            jobs.pop(seq.uid, None)
            decoder.retire_lone(seq)
        elif call == "remove":
            uid = command["uid"]
            decoder.remove(jobs.pop(uid, None) or ReplayedSequence(GenerationParams(), [], 0, uid=uid))
        elif call == "reset":
            decoder.reset()
            jobs.clear()
            self.lone.pop(key, None)
        else:
            raise RuntimeError(f"unknown decoder call from rank 0: {call!r}")


def _sequence(spec: dict) -> ReplayedSequence:
    fields = dict(spec["params"])
    fields["logit_bias"] = tuple(tuple(pair) for pair in fields["logit_bias"])
    params = GenerationParams(**fields)
    sampler, processors = request_sampling(params)
    return ReplayedSequence(params, list(spec["tokens"]), spec["max_tokens"], sampler, processors)


def follow(catalog: ModelCatalog, config: EngineConfig) -> int:
    """Run this process as a follower rank until rank 0 stops; its exit code."""
    channel = Channel(join_group(config.distributed_backend))
    log.info("rank %d of %d: following rank 0", channel.rank, channel.size)
    # A SIGTERM to the whole group (dtype-serve launch, a service manager) drains rank 0 first, which then
    # tells this rank to stop; this rank also leaves when rank 0 is gone (the watchdog).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def leave(reason: str) -> None:  # a wait that never ends: nothing else will end this process
        log.error("rank %d: leaving: %s", channel.rank, reason)
        os._exit(1)

    Watchdog(channel, config.distributed_timeout_s, leave, step_timeout_s=config.distributed_step_timeout_s).start()
    return Follower(channel, catalog, config).run()
