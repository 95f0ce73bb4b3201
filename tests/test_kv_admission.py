"""Admission under the budget's room for KV caches (models.engine.kv_admission), in pure Python with a fake
ledger: what fits starts, the rest waits first come first served and starts as running sequences end, room
is made from the prompt caches before idle variants, a request that could never fit is refused at once.
And the arithmetic of what a sequence reserves (models.mlx_lm_ext.kv_usage.grown_room): the buffers mlx-lm's
caches and ours allocate, in steps, checked against the caches themselves."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from models.decode.kv_usage import tokens_within
from models.engine.kv_admission import ADMIT, MAKE_ROOM, NEVER, WAIT, BudgetView, KVAdmission, decide
from models.mlx_lm_ext.kv_usage import CACHE_STEP, grown_room, layer_room


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


def test_a_sequences_buffers_grow_in_whole_steps_from_where_they_were_full():
    assert CACHE_STEP == 256
    assert [grown_room(0, n) for n in (1, 255, 256, 257, 512, 513)] == [256, 256, 256, 512, 512, 768]
    assert grown_room(512, 300) == 512  # room enough: nothing new
    assert grown_room(412, 413) == 668 and grown_room(412, 668) == 668  # cut short by a batch's filter
    assert tokens_within(3 * 256 * 10 - 1, 10) == 512 and tokens_within(256 * 10, 10) == 256
    assert tokens_within(255 * 10, 10) == 0 and tokens_within(-5, 10) == 0 and tokens_within(100, 0) == 0


def test_reservations_in_steps_admit_what_the_buffers_will_take():
    per_token, target = 4096, 241  # the bundled model in float32: 217 prompt + 24 max_tokens
    need = grown_room(0, target) * per_token
    assert need == 256 * per_token
    # a budget that holds three unrounded reservations holds two of what the buffers will take
    a = Admission(FakeLedger(budget=20 + 3 * target * per_token + 100, weights=20))
    assert [a.offer(Req(n, need)) for n in "abc"] == [ADMIT, ADMIT, WAIT]


def _keys(rows: int, n: int, dim: int = 64):
    import mlx.core as mx

    return mx.zeros((rows, 1, n, dim)), mx.zeros((rows, 1, n, dim))


@pytest.mark.parametrize("kind", ["KVCache", "QuantizedKVCache", "BatchKVCache", "QuantizedBatchKVCache"])
def test_grown_room_is_what_each_cache_allocates_prefilled_then_decoding(kind):
    from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache

    from models.mlx_lm_ext.quantized_batch_cache import QuantizedBatchKVCache

    cache = {"KVCache": lambda: KVCache(), "QuantizedKVCache": lambda: QuantizedKVCache(group_size=32, bits=4),
             "BatchKVCache": lambda: BatchKVCache([0]),
             "QuantizedBatchKVCache": lambda: QuantizedBatchKVCache([0], group_size=32, bits=4)}[kind]()
    written = 0
    for n in [2048, 300] + [1] * 500:  # prefill's chunks, then tokens one at a time
        cache.update_and_fetch(*_keys(1, n))
        written += n
        assert layer_room(cache) == grown_room(0, written), (kind, written)


@pytest.mark.parametrize("quantized", [False, True])
def test_a_padded_rows_reservation_is_what_the_batch_allocates_for_it(quantized):
    """A batch of rows padded to its longest, then cut short when its longest leaves: each row's room when it
    holds its target (what it reserved: grown from the room now, its padding counted) is the batch's."""
    from mlx_lm.models.cache import BatchKVCache

    from models.mlx_lm_ext.quantized_batch_cache import QuantizedBatchKVCache

    padding = [0, 90, 40]
    cache = QuantizedBatchKVCache(padding, group_size=32, bits=4) if quantized else BatchKVCache(padding)
    cache.update_and_fetch(*_keys(3, 200))  # prompts of 200, 110 and 160 tokens
    cache.filter([1, 2])  # the longest leaves: the padding the others share (40) goes, the buffers shrink
    assert layer_room(cache) == 256 - 40 and cache.left_padding.tolist() == [50, 0]
    room, held = layer_room(cache), [110, 160]
    targets = [430, 330]  # tokens each reaches: prompt + max_tokens
    reserved = [grown_room(room, p + t) for p, t in zip([50, 0], targets, strict=True)]
    assert reserved == [728, 472] and grown_room(room, 430) == 472  # its padding takes row 0 a step further
    for _ in range(max(t - h for t, h in zip(targets, held, strict=True))):
        cache.update_and_fetch(*_keys(2, 1))
        held = [h + 1 for h in held]
        for i, (h, t) in enumerate(zip(held, targets, strict=True)):
            if h <= t:
                assert layer_room(cache) <= reserved[i]  # never more than the row reserved
            if h == t:
                assert layer_room(cache) == reserved[i], (i, layer_room(cache), reserved)


def test_the_promise_of_a_variants_sequences_counts_their_rooms_and_padding():
    """models.decode.kv_usage.promised_growth over a real batch cache (a variant's other parts faked): what
    each row's buffers will take beyond those it has now, and the whole of a sequence that holds none yet."""
    from types import SimpleNamespace

    from mlx_lm.models.cache import BatchKVCache

    from models.decode.kv_usage import live_kv_bytes, promised_growth

    cache = BatchKVCache([0, 90, 40])
    cache.update_and_fetch(*_keys(3, 200))
    cache.filter([1, 2])  # rows of 110 and 160 tokens, padded by 50 and 0, in buffers of 216 positions
    batch = SimpleNamespace(uids=[7, 8], prompt_cache=[cache])
    variant = SimpleNamespace(
        scheduler=None, kv=None, generator=SimpleNamespace(_generation_batch=batch, _prompt_batch=None),
        loaded=SimpleNamespace(float_dtype="float32", config={"num_hidden_layers": 1, "num_attention_heads": 1,
                                                               "hidden_size": 64}))
    per_token = 2 * 64 * 4  # keys and values of one layer, one head of 64, float32
    assert live_kv_bytes(variant) == 2 * 216 * per_token
    # row 7 reaches 50 + 430 positions: two steps past 216; row 8 330: one; 9, not started, a step of its own
    assert promised_growth(variant, {7: 430, 8: 330}) == (512 + 256) * per_token
    assert promised_growth(variant, {7: 430, 8: 330, 9: 100}) == (512 + 256 + 256) * per_token
    assert promised_growth(variant, {7: 160, 8: 200}) == 0  # room enough in the buffers they have
