"""Decode-step timelines: every BatchGenerator step (`_next`, which `next` and `next_generated` call)
and SingleStream.step call of a run, with the
batch it worked on, so two runs of the same load (the engine, BatchGenerator driven directly) can be
compared step by step: how many steps, how long a full-batch step takes, what the ramp and tail cost.

Used by `bench.overhead --timeline`; it patches the two classes in the benchmark's process only.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any


class StepRecorder:
    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.active = False

    @contextmanager
    def recording(self):
        """Record the steps taken inside the block (the patches stay; only recording toggles)."""
        self.steps, self.active = [], True
        start = time.perf_counter()
        try:
            yield
        finally:
            self.active = False
            self.wall = time.perf_counter() - start
            self.start = start

    def install(self) -> None:
        from mlx_lm.generate import BatchGenerator

        from models.decode.single_stream import SingleStream

        recorder = self
        batch_next = BatchGenerator._next
        single_step = SingleStream.step

        def next_(gen: Any):
            if not recorder.active:
                return batch_next(gen)
            before = dict(generating=len(gen._generation_batch), prefilling=len(gen._prompt_batch),
                          waiting=len(gen._unprocessed_sequences))
            t0 = time.perf_counter()
            out = batch_next(gen)
            recorder.steps.append({"kind": "batch", "t0": t0, "t1": time.perf_counter(), **before,
                                   "tokens": len(out[1])})
            return out

        def step(stream: Any, queue_next: bool = True):
            if not recorder.active:
                return single_step(stream, queue_next)
            t0 = time.perf_counter()
            out = single_step(stream, queue_next)
            recorder.steps.append({"kind": "single", "t0": t0, "t1": time.perf_counter(), "generating": 1,
                                   "prefilling": 0, "waiting": 0, "tokens": 1})
            return out

        BatchGenerator._next = next_
        SingleStream.step = step

    def summary(self, full: int) -> dict:
        """Where the run's wall time went: steps at the full batch (`full` decoding, nothing to
        prefill), other steps (ramp, prefill, tail), and time between steps (the caller's own work)."""
        steps = self.steps
        if not steps:
            return {}
        in_steps = sum(s["t1"] - s["t0"] for s in steps)
        steady = [s["t1"] - s["t0"] for s in steps
                  if s["kind"] == "batch" and s["generating"] == full and not s["prefilling"] and not s["waiting"]]
        between = [b["t0"] - a["t1"] for a, b in zip(steps, steps[1:], strict=False)]
        return {
            "wall_s": round(self.wall, 4),
            "before_first_step_s": round(steps[0]["t0"] - self.start, 4),
            "after_last_step_s": round(self.start + self.wall - steps[-1]["t1"], 4),
            "steps": len(steps),
            "single_steps": sum(s["kind"] == "single" for s in steps),
            "prefill_steps": sum(bool(s["prefilling"] or s["waiting"]) for s in steps),
            "in_steps_s": round(in_steps, 4),
            "between_steps_s": round(sum(between), 4),
            "full_batch_steps": len(steady),
            "full_batch_step_ms": round(1000 * statistics.median(steady), 3) if steady else None,
            "other_steps_s": round(in_steps - sum(steady), 4),
            "between_step_ms": round(1000 * statistics.median(between), 3) if between else None,
            "tokens": sum(s["tokens"] for s in steps),
        }
