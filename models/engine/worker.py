"""The one MLX worker thread: typed commands in, burst gathering, one decode step per variant per turn."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from models.api import WorkerStats
from models.engine.config import EngineConfig
from models.engine.outbox import Outbox
from models.engine.scoring import ScoreCall, take_score_calls
from models.engine.sequence import Sequence
from models.errors import EngineError, EngineUnavailableError, GenerationFailedError, unexpected_failure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generate:
    """Admit this request (its sequence, prompt encoded or not)."""

    seq: Sequence


@dataclass(frozen=True)
class Call:
    """Run `fn` on the worker; its result (or error) settles `future` on `loop`."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look again (a client left: its sequence is dropped at the next step)."""


@dataclass(frozen=True)
class Stop:
    """Answer what is left with an error and end the thread."""


Command = Generate | Call | Wake | Stop


class Host(Protocol):
    """What the worker runs (models.engine.serving.Serving)."""

    def busy(self) -> bool: ...  # requests decode or a report runs: do not block on the queue
    def serving(self) -> bool: ...  # requests decode
    def admit(self, seq: Sequence, burst: bool) -> None: ...
    def admit_waiting(self) -> None: ...  # requests that waited for memory and fit now
    def step_all(self) -> None: ...
    def start_held(self) -> None: ...  # after a flush: steps held until their first tokens went out
    def step_report(self) -> None: ...
    def idle(self, now: float) -> None: ...
    def fail_all(self, error: EngineError) -> None: ...


class Traffic:
    """Requests open at once, as the event loop sees them (it writes; the worker reads): whether the
    next request that finds the worker idle is likely the first of a burst."""

    def __init__(self) -> None:
        self.open = 0  # admitted and not finished
        self.overlap_at = float("-inf")  # when two or more requests were last open at once
        self.busy_peak = 0  # most requests open at once since the engine was last without any
        self.last_busy_peak = 0  # ...and that figure for the busy spell before

    def opened(self) -> None:
        self.open += 1
        self.busy_peak = max(self.busy_peak, self.open)
        if self.open > 1:
            self.overlap_at = time.monotonic()

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.last_busy_peak, self.busy_peak = self.busy_peak, 0

    def forget(self) -> None:
        """The traffic so far says nothing about what comes (e.g. the warm-up's)."""
        self.overlap_at = float("-inf")
        self.last_busy_peak = 0


class PhaseClock:
    """Charges the worker's time to phases (WorkerStats.seconds), lap by lap."""

    def __init__(self, stats: WorkerStats) -> None:
        self.seconds = stats.seconds
        self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`."""
        now = time.perf_counter()
        self.seconds[phase] += now - self._start
        self._start = now


class Worker:
    """The thread that owns every MLX call. Commands arrive on `commands`; each turn it admits what
    arrived, runs one decode step per serving variant and a slice of a running report, then flushes."""

    def __init__(self, config: EngineConfig, host: Host, outbox: Outbox, stats: WorkerStats, clock: PhaseClock,
                 traffic: Traffic, on_death: Callable[[str], None]) -> None:
        self.config = config
        self.host = host
        self.outbox = outbox
        self.stats = stats
        self.clock = clock
        self.traffic = traffic
        self.on_death = on_death
        self.commands: queue.Queue[Command] = queue.Queue()
        self._pulled: list[Command] = []  # taken off the queue and not handled yet
        self._load_step_at = 0.0
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="mlx-worker", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return bool(self.thread and self.thread.is_alive())

    def put(self, command: Command) -> None:
        self.commands.put(command)

    def stop_soon(self) -> None:
        """End the thread once the commands before this one are handled; the rest get an error."""
        self.commands.put(Stop())

    def run(self) -> None:
        try:
            while True:
                busy = self.host.busy()
                try:
                    command = self.commands.get(block=not busy, timeout=None if busy else self.config.idle_poll_s)
                except queue.Empty:
                    command = None
                self.clock.lap("idle")
                commands = self._pulled
                while command is not None:
                    commands.append(command)
                    if isinstance(command, Stop):  # what follows stays queued: _fail_all answers it
                        break
                    try:
                        command = self.commands.get_nowait()
                    except queue.Empty:
                        command = None
                if not busy and self._expect_more(commands):
                    self._gather(commands)
                self._score_together(commands)  # prompt-scoring calls, batched per variant
                # Requests that arrived together start together in the batch: one prefill for all
                burst = _generates(commands) > 1
                while commands:
                    command = commands.pop(0)
                    if isinstance(command, Stop):
                        self._fail_all(EngineUnavailableError("the engine stopped"))
                        return
                    self._handle(command, burst)
                self.host.admit_waiting()
                self.clock.lap("admit")
                self.host.step_all()
                self.host.step_report()
                self.clock.lap("report")
                self._send(force=not busy)
                self.clock.lap("flush")
                if not busy:
                    self.host.idle(time.time())
        except BaseException as e:  # the worker must never die silently: health turns 503
            log.exception("MLX worker died")
            reason = f"the engine worker failed: {type(e).__name__}"
            self.on_death(reason)
            self._fail_all(EngineUnavailableError(reason))
        finally:
            self.outbox.flush(force=True)

    def serve_during_load(self) -> None:
        """Between two tensors of a load: one decode step for the variants already serving (at most every
        load_step_s), so that loading a large model does not stall their streams for its whole length."""
        now = time.perf_counter()
        if now - self._load_step_at < self.config.load_step_s or not self.host.serving():
            return
        self.clock.lap("admit")
        steps = self.stats.decode_steps
        self.host.step_all()
        self.stats.steps_during_loads += self.stats.decode_steps - steps
        self._send()
        self._load_step_at = time.perf_counter()

    def _send(self, force: bool = False) -> None:
        """Hand the steps' events to their event loops, then start the decode steps held behind them."""
        self.outbox.flush(force=force)
        self.host.start_held()

    def _score_together(self, commands: list[Command]) -> None:
        """Run the scoring calls among the pulled `commands` as batches; those past this iteration's share go
        back to the queue (models.engine.scoring). With a Stop among them, _fail_all answers them instead."""
        calls = [c for c in commands if isinstance(c, Call) and isinstance(c.fn, ScoreCall)]
        if not calls or any(isinstance(c, Stop) for c in commands):
            return
        for command in calls:
            commands.remove(command)
        taken, later = take_score_calls(calls, self.config.max_batch_size)
        for command in later:
            self.commands.put(command)
        answers = taken[0].fn.scorer.scored([c.fn for c in taken])
        for command, (value, error) in zip(taken, answers, strict=True):
            command.loop.call_soon_threadsafe(_settle, command.future, value, error)

    def _expect_more(self, commands: list[Command]) -> bool:
        """Requests overlapped lately, and the engine's last busy spell was not a lone request's: a
        client that sends one request after another does not wait before each of them."""
        config, traffic = self.config, self.traffic
        return (config.gather_s > 0 and 0 < _generates(commands) < config.max_batch_size
                and not any(isinstance(c, Stop) for c in commands)
                and time.monotonic() - traffic.overlap_at < config.concurrent_recently_s
                and traffic.last_busy_peak != 1)

    def _gather(self, commands: list[Command]) -> None:
        """Take the requests that follow within gather_gap_s of each other (at most gather_s)."""
        deadline = time.monotonic() + self.config.gather_s
        taken = len(commands)
        while (wait := min(self.config.gather_gap_s, deadline - time.monotonic())) > 0:
            try:
                command = self.commands.get(timeout=wait)
            except queue.Empty:
                break
            commands.append(command)
            if isinstance(command, Stop) or _generates(commands) >= self.config.max_batch_size:
                break
        self.stats.gather_waits += 1
        self.stats.bursts_gathered += len(commands) > taken

    def _handle(self, command: Command, burst: bool) -> None:
        if isinstance(command, Generate):
            try:
                self.host.admit(command.seq, burst)
            except EngineError as e:
                command.seq.fail(e)
            except Exception as e:  # a load or prefill that failed in an unexpected way: this request only
                log.exception("admitting a request failed")
                command.seq.fail(unexpected_failure(e, _variant_name(command.seq)))
        elif isinstance(command, Call):
            try:
                result, error = command.fn(), None
            except EngineError as e:
                result, error = None, e
            except Exception as e:
                log.exception("engine call failed")
                result, error = None, GenerationFailedError(f"internal error: {type(e).__name__}")
            except BaseException:  # the worker is going down: answer the caller first
                command.loop.call_soon_threadsafe(_settle, command.future, None,
                                                  EngineUnavailableError("the engine worker failed"))
                raise
            command.loop.call_soon_threadsafe(_settle, command.future, result, error)

    def fail_calls(self, error: EngineError) -> None:
        """From another thread, while this one is blocked for good (a lost distributed group): answer the
        calls it holds or has queued with `error` (its requests are answered by the engine)."""
        pending = list(self._pulled)
        while True:
            try:
                pending.append(self.commands.get_nowait())
            except queue.Empty:
                break
        for command in pending:
            if isinstance(command, Call):
                command.loop.call_soon_threadsafe(_settle, command.future, None, error)

    def _fail_all(self, error: EngineError) -> None:
        """The worker is going down: answer every request without touching MLX again."""
        self.host.fail_all(error)
        while True:
            try:
                command = self._pulled.pop(0) if self._pulled else self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, Generate):
                command.seq.fail(error)
            elif isinstance(command, Call):
                command.loop.call_soon_threadsafe(_settle, command.future, None, error)


def _generates(commands: list[Command]) -> int:
    """How many of the commands are requests to generate."""
    return sum(isinstance(c, Generate) for c in commands)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _variant_name(seq: Any) -> str:
    """`model:dtype` of the variant a request was admitted to, or the one it asked for."""
    if seq.variant is not None:
        return ":".join(seq.variant.key)
    return f"{seq.params.model or 'the default model'}:{seq.params.dtype or 'its default dtype'}"
