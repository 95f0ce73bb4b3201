"""Admission under the memory budget's room for KV caches (no MLX: byte counts in, decisions out).

A request's KV cache grows to prompt + max_tokens tokens, its buffers to that rounded up to the caches' step
(models.decode.kv_usage, which also states what the reservation does not foresee: padding in a batch after
admission). It starts only if that growth fits what the budget leaves after what is held (weights, prompt
caches, live KV caches) and what running sequences were promised (the growth still to come of theirs). If
it does not, the prompt caches are shrunk and idle variants evicted (the ledger's `make_room`); if that is not
enough, it waits, first come first served, until running sequences end. A request that would not fit even
with nothing else running is refused at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

ADMIT, MAKE_ROOM, WAIT, NEVER = "admit", "make_room", "wait", "never"

T = TypeVar("T")


@dataclass(frozen=True)
class BudgetView:
    """The budget as one request sees it, in bytes."""

    budget: int
    held: int  # weights, prompt caches and live KV caches now
    promised: int  # growth still to come of the running sequences' KV buffers (to prompt + max_tokens, in steps)
    reclaimable: int  # what can be freed without touching a running request: prompt caches, idle variants
    floor: int  # held even with nothing else resident: the request's own variant and the pinned ones

    @property
    def free(self) -> int:
        return self.budget - self.held - self.promised

    @property
    def most(self) -> int:
        """The most a request's KV cache could ever have here (everything else gone)."""
        return self.budget - self.floor


def decide(view: BudgetView, need: int) -> str:
    """ADMIT: `need` bytes fit now; MAKE_ROOM: after the prompt caches and idle variants go; WAIT: only once
    running sequences end; NEVER: not even alone."""
    if need > view.most:
        return NEVER
    if need <= view.free:
        return ADMIT
    if need <= view.free + view.reclaimable:
        return MAKE_ROOM
    return WAIT


@dataclass(frozen=True)
class Verdict:
    decision: str  # ADMIT, WAIT or NEVER
    need: int
    view: BudgetView


class Ledger(Protocol[T]):
    """What admission asks of the engine about a request `item`."""

    def need(self, item: T) -> int:
        """Bytes `item`'s KV cache buffers reach at prompt + max_tokens tokens."""

    def view(self, item: T) -> BudgetView:
        """The budget now, as `item` sees it."""

    def make_room(self, item: T, need: int) -> None:
        """Shrink the prompt caches, then evict idle variants (never `item`'s), until `need` fits if it can."""

    def running(self) -> bool:
        """Whether any sequence decodes (one ending may free room)."""


class KVAdmission(Generic[T]):
    """The requests waiting for KV room, first come first served: a request that arrives while others
    wait queues behind them, so a large one is never overtaken for ever by smaller ones."""

    def __init__(self, ledger: Ledger[T]) -> None:
        self.ledger = ledger
        self.waiting: deque[T] = deque()

    def __len__(self) -> int:
        return len(self.waiting)

    def offer(self, item: T) -> Verdict:
        """ADMIT: start `item` now. WAIT: it was queued (`ready` gives it back when it fits). NEVER: refuse it."""
        need, view = self.ledger.need(item), self.ledger.view(item)
        if decide(view, need) == NEVER:
            return Verdict(NEVER, need, view)
        verdict = Verdict(WAIT, need, view) if self.waiting else self._judge(item)
        if verdict.decision == WAIT:
            self.waiting.append(item)
        return verdict

    def ready(self, start: Callable[[T], None], refuse: Callable[[T, Verdict], None]) -> int:
        """Start the waiting requests that fit now, from the head, in order, each counted before the next is
        judged, stopping at the first that does not fit; a head that does not fit while nothing runs can
        only be refused (nothing will free room). How many were started."""
        started = 0
        while self.waiting:
            verdict = self._judge(self.waiting[0])
            if verdict.decision == WAIT and not self.ledger.running():
                verdict = Verdict(NEVER, verdict.need, verdict.view)
            if verdict.decision == WAIT:
                break
            item = self.waiting.popleft()
            if verdict.decision == NEVER:
                refuse(item, verdict)
            else:
                start(item)
                started += 1
        return started

    def drop(self, gone: Callable[[T], bool]) -> list[T]:
        """Take out the waiting requests for which `gone` holds (their clients left); those taken."""
        taken = [item for item in self.waiting if gone(item)]
        if taken:
            self.waiting = deque(item for item in self.waiting if not gone(item))
        return taken

    def _judge(self, item: T) -> Verdict:
        """ADMIT, WAIT or NEVER for `item`, making room first where that is enough."""
        ledger = self.ledger
        need = ledger.need(item)
        view = ledger.view(item)
        decision = decide(view, need)
        if decision == MAKE_ROOM:
            ledger.make_room(item, need)
            view = ledger.view(item)
            decision = ADMIT if need <= view.free else WAIT  # sharing: evicting may free less than counted
        return Verdict(decision, need, view)
