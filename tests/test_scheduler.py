"""The per-variant scheduler's lone <-> batch state machine, driven with a fake decoder in pure Python (no
MLX, no threads, no sleeps): what it asks the decoder for, in which order, and what each sequence receives."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from models.engine.scheduler import BATCH, HAND_OFF, IDLE, JOINING, LONE, VariantScheduler


@dataclass(eq=False)
class Seq:
    name: str
    max_tokens: int = 4
    uid: int = 0
    cancelled: bool = False
    done: bool = False
    tokens: list[int] = field(default_factory=list)  # the n-th token a sequence decodes is n


@dataclass
class Response:
    uid: int
    token: int
    finish_reason: str | None = None


class FakeDecoder:
    """A decoder that counts: a sequence's n-th token is n; a sequence inserted into the batch is prefilled
    on its first batch step (no response), then decodes a token per step."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.lone: list | None = None  # [seq, tokens decoded]
        self.batch: dict[int, list] = {}  # uid -> [seq, tokens decoded, prefilled]
        self.handed_off: list | None = None
        self.next_uid = 0
        self.fail = False

    def _response(self, uid: int, seq: Seq, n: int) -> Response:
        return Response(uid, n, "length" if n >= seq.max_tokens else None)

    def start_lone(self, seq: Seq) -> int:
        self.calls.append(("start_lone", seq.name))
        self.lone = [seq, 0]
        return -1

    def insert(self, seq: Seq) -> int:
        self.calls.append(("insert", seq.name))
        self.next_uid += 1
        self.batch[self.next_uid] = [seq, 0, False]
        return self.next_uid

    def step_lone(self) -> Response:
        self.calls.append(("step_lone",))
        if self.fail:
            raise MemoryError("simulated out of memory")
        self.lone[1] += 1
        return self._response(-1, *self.lone)

    def step_batch(self, beside_lone: bool) -> list[Response]:
        self.calls.append(("step_batch", beside_lone))
        if self.fail:
            raise MemoryError("simulated out of memory")
        responses = []
        for uid, entry in list(self.batch.items()):
            if not entry[2]:
                entry[2] = True  # this step prefilled it
                continue
            entry[1] += 1
            responses.append(self._response(uid, entry[0], entry[1]))
            if responses[-1].finish_reason:
                del self.batch[uid]
        return responses

    def hand_off(self) -> Response:
        seq, n = self.lone
        self.calls.append(("hand_off", seq.name))
        self.lone, self.handed_off = None, [seq, n + 1]
        return self._response(-1, seq, n + 1)

    def rejoin(self, seq: Seq) -> int:
        self.calls.append(("rejoin", seq.name))
        self.next_uid += 1
        self.batch[self.next_uid] = [seq, self.handed_off[1], True]  # goes on where it stopped
        self.handed_off = None
        return self.next_uid

    def retire_lone(self, seq: Seq) -> None:
        self.calls.append(("retire_lone", seq.name))
        self.lone = None

    def remove(self, seq: Seq) -> None:
        self.calls.append(("remove", seq.name))
        del self.batch[seq.uid]

    def reset(self) -> None:
        self.calls.append(("reset",))
        self.lone, self.batch = None, {}


class Driver:
    """Handles the scheduler's outputs the way the engine does: each token to its sequence, finishing it
    on the decoder's reason, then whatever the scheduler does next."""

    def __init__(self, max_batch_size: int = 8, single_stream: bool = True) -> None:
        self.decoder = FakeDecoder()
        self.scheduler = VariantScheduler(self.decoder, {}, max_batch_size, single_stream)
        self.kinds: list[str] = []

    def handle(self, output) -> None:
        while output is not None:
            self.kinds.append(output.kind)
            for response in output.responses:
                seq = self.scheduler.seqs.get(response.uid)
                if seq is None:
                    continue
                seq.tokens.append(response.token)
                if response.finish_reason:
                    self.scheduler.finish(seq)
                    seq.done = True
            output = self.scheduler.update_from_output(output)

    def admit(self, seq: Seq, burst: bool = False) -> None:
        self.handle(self.scheduler.admit(seq, burst))

    def step(self):
        output = self.scheduler.step()
        if output is not None and output.error is None:
            self.handle(output)
        return output

    @property
    def state(self) -> str:
        return self.scheduler.state

    def calls_since(self, n: int) -> list[tuple]:
        return self.decoder.calls[n:]


def test_a_lone_request_decodes_alone_and_leaves_the_variant_idle():
    d = Driver()
    a = Seq("a", max_tokens=3)
    d.admit(a)
    assert d.state == LONE and d.decoder.calls == [("start_lone", "a")]
    for _ in range(3):
        d.step()
    assert a.tokens == [1, 2, 3] and a.done
    assert d.state == IDLE and d.step() is None
    assert d.decoder.calls[-1] == ("retire_lone", "a")  # its KV cache may be reused
    assert ("step_batch", True) not in d.decoder.calls and ("step_batch", False) not in d.decoder.calls


def test_a_second_request_joins_then_the_lone_one_is_handed_off_once_it_decodes():
    d = Driver()
    a, b = Seq("a", max_tokens=6), Seq("b", max_tokens=3)
    d.admit(a)
    d.step()
    d.admit(b)
    assert d.state == JOINING and d.scheduler.joining == {b.uid}
    n = len(d.decoder.calls)
    d.step()  # b is prefilled beside the lone stream: no token for it yet
    assert d.calls_since(n) == [("step_lone",), ("step_batch", True)]
    assert d.state == JOINING and b.tokens == []
    n = len(d.decoder.calls)
    d.step()  # b decodes: a moves into the batch with its next token
    assert d.calls_since(n) == [("step_lone",), ("step_batch", True), ("hand_off", "a"), ("rejoin", "a")]
    assert d.kinds.count(HAND_OFF) == 1 and d.state == BATCH and a.uid > 0
    while not (a.done and b.done):
        d.step()
    assert a.tokens == [1, 2, 3, 4, 5, 6] and b.tokens == [1, 2, 3]  # nothing lost or repeated at the hand-off
    assert ("step_lone",) not in d.decoder.calls[d.decoder.calls.index(("rejoin", "a")):]
    assert d.state == IDLE and d.kinds.count(HAND_OFF) == 1


def test_a_full_batch_hands_the_lone_stream_off_before_the_newcomer_is_inserted():
    d = Driver(max_batch_size=2)
    a, b, c = Seq("a", max_tokens=8), Seq("b"), Seq("c")
    d.admit(a)
    d.step()
    d.admit(b)
    assert d.state == JOINING
    n = len(d.decoder.calls)
    d.admit(c)  # a, b and c cannot all decode: a takes its batch slot first
    assert d.calls_since(n) == [("hand_off", "a"), ("rejoin", "a"), ("insert", "c")]
    assert a.tokens == [1, 2] and d.state == BATCH and d.scheduler.joining == set()
    assert set(d.scheduler.seqs.values()) == {a, b, c}


@pytest.mark.parametrize("state", [LONE, JOINING, BATCH])
def test_a_cancelled_request_is_removed_at_the_next_step_in_every_state(state):
    d = Driver()
    a, b = Seq("a", max_tokens=20), Seq("b", max_tokens=20)
    d.admit(a, burst=state == BATCH)
    if state == JOINING:
        d.step()
        d.admit(b)
    assert d.state == state
    a.cancelled = True
    n = len(d.decoder.calls)
    d.step()
    assert a.done and a not in d.scheduler.seqs.values()
    assert d.calls_since(n)[0] == (("retire_lone", "a") if state in (LONE, JOINING) else ("remove", "a"))
    assert d.state == {LONE: IDLE, JOINING: BATCH, BATCH: IDLE}[state]
    if state == JOINING:  # the newcomer decodes on in the batch, with no hand-off
        b.cancelled = True
        d.step()
        assert ("remove", "b") in d.decoder.calls and d.state == IDLE and HAND_OFF not in d.kinds


def test_a_newcomer_cancelled_while_joining_leaves_the_lone_stream_alone():
    d = Driver()
    a, b = Seq("a", max_tokens=5), Seq("b")
    d.admit(a)
    d.admit(b)
    b.cancelled = True
    d.step()
    assert ("remove", "b") in d.decoder.calls and d.state == LONE
    while not a.done:
        d.step()
    assert a.tokens == [1, 2, 3, 4, 5] and HAND_OFF not in d.kinds


def test_finishing_in_each_state():
    # the lone stream finishes while a newcomer joins: the newcomer decodes on in the batch
    d = Driver()
    a, b = Seq("a", max_tokens=2), Seq("b", max_tokens=3)
    d.admit(a)
    d.step()
    d.admit(b)
    d.step()
    assert a.done and d.state == BATCH and d.decoder.calls[-1] == ("retire_lone", "a")
    while not b.done:
        d.step()
    assert b.tokens == [1, 2, 3] and d.state == IDLE and HAND_OFF not in d.kinds
    # a newcomer that ends on its first token: no hand-off, the lone stream goes on alone
    d = Driver()
    a, b = Seq("a", max_tokens=6), Seq("b", max_tokens=1)
    d.admit(a)
    d.admit(b)
    d.step()
    d.step()
    assert b.done and b.tokens == [1] and d.state == LONE and HAND_OFF not in d.kinds
    # the token handed off ends the lone sequence: it is not put into the batch
    d = Driver()
    a, b = Seq("a", max_tokens=3), Seq("b", max_tokens=3)
    d.admit(a)
    d.admit(b)
    d.step()  # a: 1; b prefilled
    d.step()  # a: 2; b decodes -> hand-off gives a its 3rd and last token
    assert a.tokens == [1, 2, 3] and a.done and ("rejoin", "a") not in d.decoder.calls
    assert d.state == BATCH and list(d.scheduler.seqs.values()) == [b]


def test_a_stop_string_removes_the_sequence_wherever_it_decodes():
    d = Driver()
    a, b = Seq("a", max_tokens=9), Seq("b", max_tokens=9)
    d.admit(a)
    d.step()
    d.scheduler.remove(a)  # the engine saw a stop string in a's text
    assert d.decoder.calls[-1] == ("retire_lone", "a") and d.state == IDLE
    d.admit(a, burst=True)
    d.admit(b, burst=True)
    d.step()
    d.scheduler.remove(b)
    assert d.decoder.calls[-1] == ("remove", "b") and list(d.scheduler.seqs.values()) == [a]


def test_a_failed_step_fails_that_variant_only():
    broken, healthy = Driver(), Driver()
    a, b, c = Seq("a", max_tokens=9), Seq("b"), Seq("c", max_tokens=3)
    broken.admit(a)
    broken.admit(b)
    healthy.admit(c)
    broken.decoder.fail = True
    output = broken.step()
    assert isinstance(output.error, MemoryError) and set(output.failed) == {a, b}
    assert broken.state == IDLE and broken.decoder.calls[-1] == ("reset",) and broken.step() is None
    for _ in range(3):
        healthy.step()
    assert c.tokens == [1, 2, 3] and c.done
    broken.decoder.fail = False
    d = Seq("d", max_tokens=2)
    broken.admit(d)  # the variant serves again
    broken.step()
    broken.step()
    assert d.tokens == [1, 2] and broken.state == IDLE


def test_a_burst_goes_straight_to_the_batch():
    d = Driver()
    seqs = [Seq(name, max_tokens=2) for name in "abc"]
    for seq in seqs:
        d.admit(seq, burst=True)
    assert d.decoder.calls == [("insert", "a"), ("insert", "b"), ("insert", "c")] and d.state == BATCH
    for _ in range(3):
        d.step()
    assert all(s.tokens == [1, 2] for s in seqs) and d.state == IDLE
    assert ("step_lone",) not in d.decoder.calls and HAND_OFF not in d.kinds


def test_without_the_single_stream_a_lone_request_starts_in_the_batch():
    d = Driver(single_stream=False)
    d.admit(Seq("a"))
    assert d.decoder.calls == [("insert", "a")] and d.state == BATCH
