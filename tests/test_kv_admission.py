"""Admission under the budget's room for KV caches (models.engine.kv_admission), in pure Python with a fake
ledger: what fits starts, the rest waits first come first served and starts as running sequences end, room
is made from the prompt caches before idle variants, a request that could never fit is refused at once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from models.engine.kv_admission import ADMIT, MAKE_ROOM, NEVER, WAIT, BudgetView, KVAdmission, decide


@dataclass(eq=False)
class Req:
    name: str
    need: int
    cancelled: bool = False


class FakeLedger:
    """A budget of `budget` bytes holding `weights` (never freed), a prompt cache and idle variants (freed on
    demand, prompt cache first), and the requests running, each promised its whole need."""

    def __init__(self, budget: int, weights: int, prompt_cache: int = 0, idle: tuple[int, ...] = ()) -> None:
        self.budget, self.weights, self.prompt_cache, self.idle = budget, weights, prompt_cache, list(idle)
        self.running_reqs: list[Req] = []
        self.freed: list[str] = []  # what make_room freed, in order

    def need(self, item: Req) -> int:
        return item.need

    def view(self, item: Req) -> BudgetView:
        held = self.weights + self.prompt_cache + sum(self.idle)
        return BudgetView(self.budget, held=held, promised=sum(r.need for r in self.running_reqs),
                          reclaimable=self.prompt_cache + sum(self.idle), floor=self.weights)

    def make_room(self, item: Req, need: int) -> None:
        if self.prompt_cache:
            self.prompt_cache = 0
            self.freed.append("prompt_cache")
        while self.idle and self.view(item).free < need:
            self.freed.append(f"variant of {self.idle.pop(0)}")

    def running(self) -> bool:
        return bool(self.running_reqs)

    def finish(self, req: Req) -> None:
        self.running_reqs.remove(req)


class Admission:
    """Drives KVAdmission the way the engine does: an admitted request runs until `finish`."""

    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger = ledger
        self.kv = KVAdmission(ledger)
        self.started: list[str] = []
        self.refused: list[tuple[str, int]] = []  # (name, the most it could have had)

    def offer(self, req: Req) -> str:
        verdict = self.kv.offer(req)
        if verdict.decision == ADMIT:
            self._start(req)
        return verdict.decision

    def finish(self, req: Req) -> int:
        self.ledger.finish(req)
        return self.kv.ready(self._start, lambda r, v: self.refused.append((r.name, v.view.most)))

    def _start(self, req: Req) -> None:
        self.ledger.running_reqs.append(req)
        self.started.append(req.name)


@pytest.mark.parametrize("need,expected", [
    (30, ADMIT),  # free: 100 - 50 held - 20 promised
    (31, MAKE_ROOM), (40, MAKE_ROOM),  # 10 reclaimable
    (41, WAIT), (70, WAIT),  # fits once the running sequences end: 100 - 30 floor
    (71, NEVER),
])
def test_the_decision_at_each_boundary(need, expected):
    view = BudgetView(budget=100, held=50, promised=20, reclaimable=10, floor=30)
    assert decide(view, need) == expected


def test_requests_start_while_their_growth_fits_then_wait_and_start_in_order_as_others_end():
    a = Admission(FakeLedger(budget=100, weights=20))
    reqs = [Req(n, 30) for n in "abcde"]
    assert [a.offer(r) for r in reqs] == [ADMIT, ADMIT, WAIT, WAIT, WAIT]  # 20 + 2 x 30 = 80: a third needs 110
    assert a.started == ["a", "b"] and [r.name for r in a.kv.waiting] == ["c", "d", "e"]
    assert a.finish(reqs[0]) == 1  # 30 freed: one more, counted before the next is judged
    assert a.started == ["a", "b", "c"] and len(a.kv) == 2
    a.finish(reqs[1])
    a.finish(reqs[2])
    assert a.started == ["a", "b", "c", "d", "e"] and not a.kv.waiting and not a.refused


def test_a_small_request_never_overtakes_a_large_waiting_one():
    a = Admission(FakeLedger(budget=100, weights=20))
    running = Req("running", 50)
    assert a.offer(running) == ADMIT
    assert a.offer(Req("large", 60)) == WAIT
    assert a.offer(Req("small", 10)) == WAIT  # it would fit now (30 free), but "large" came first
    assert a.finish(running) == 2
    assert a.started == ["running", "large", "small"]


def test_room_is_made_from_the_prompt_cache_first_then_idle_variants_only_as_far_as_needed():
    ledger = FakeLedger(budget=100, weights=20, prompt_cache=10, idle=(15, 15, 15))
    a = Admission(ledger)
    assert a.offer(Req("a", 20)) == ADMIT and ledger.freed == []  # 25 free: nothing dropped
    assert a.offer(Req("b", 20)) == ADMIT
    assert ledger.freed == ["prompt_cache", "variant of 15"]  # 5 free: the prompt cache, then one variant
    assert ledger.idle == [15, 15]


def test_a_request_that_could_never_fit_is_refused_at_once_and_queues_nothing():
    ledger = FakeLedger(budget=100, weights=40, idle=(30,))
    a = Admission(ledger)
    running = Req("running", 50)
    assert a.offer(running) == ADMIT and ledger.freed == ["variant of 30"]
    assert a.offer(Req("waits", 40)) == WAIT
    assert a.offer(Req("huge", 61)) == NEVER  # 100 - 40 of weights that stay
    assert [r.name for r in a.kv.waiting] == ["waits"]
    a.finish(running)
    assert a.started == ["running", "waits"]


def test_a_head_that_cannot_fit_with_nothing_running_is_refused_not_left_waiting():
    ledger = FakeLedger(budget=100, weights=20)
    a = Admission(ledger)
    running = Req("running", 40)
    a.offer(running)
    stuck = Req("stuck", 70)
    assert a.offer(stuck) == WAIT
    ledger.weights = 50  # e.g. another variant's weights that cannot go while its own requests wait
    a.finish(running)
    assert a.refused == [("stuck", 50)] and not a.kv.waiting


def test_requests_whose_clients_left_are_dropped_from_the_queue():
    a = Admission(FakeLedger(budget=100, weights=20))
    running = Req("running", 80)
    a.offer(running)
    gone, stays = Req("gone", 30), Req("stays", 30)
    a.offer(gone)
    a.offer(stays)
    gone.cancelled = True
    assert a.kv.drop(lambda r: r.cancelled) == [gone]
    a.finish(running)
    assert a.started == ["running", "stays"]
