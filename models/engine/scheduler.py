"""Per-variant admission and the lone <-> batch state machine, over a `Decoder` (no MLX here).

    idle --first request--> LONE --another arrives--> JOINING --every newcomer decodes--> hand-off --> BATCH
    idle --a burst (requests admitted together)--> BATCH;     BATCH/LONE --last request ends--> idle

A request that finds its variant idle decodes alone (the lone stream: batching costs something at batch
size one). Requests arriving meanwhile are prefilled in the batch while the lone stream keeps decoding
(JOINING); once each of them has decoded a token, the lone sequence is handed off into the batch, KV cache
and next token included. If the batch has no room for both, the hand-off comes first.

Like vLLM's Scheduler, it returns plain outputs: `step()` runs one decode step and returns a `StepOutput`;
the caller turns its responses into text (finishing or removing sequences through `finish`/`remove`), then
passes it to `update_from_output`, which may return the next output to handle (a hand-off's token) or None.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

IDLE, LONE, JOINING, BATCH = "idle", "lone", "joining", "batch"
STEP, HAND_OFF = "step", "hand_off"


class Schedulable(Protocol):
    uid: int  # set by the scheduler from the decoder's answer
    cancelled: bool  # set by the client's side: removed at the next step
    done: bool


class Decoder(Protocol):
    """What the scheduler drives for one variant. A response has at least `uid`."""

    def start_lone(self, seq: Any) -> int:
        """Prefill `seq` and decode it alone; its uid (never one the batch uses)."""

    def insert(self, seq: Any) -> int:
        """Add `seq` to the batch, to be prefilled there; its uid."""

    def step_lone(self) -> Any:
        """The lone sequence's next token."""

    def step_batch(self, beside_lone: bool) -> list:
        """One batch step: the responses of the sequences that decoded (those still prefilling give none)."""

    def start_held(self) -> None:
        """Start a decode step queued by the last step but held until its first tokens were sent."""

    def hand_off(self) -> Any:
        """Close the lone stream: its next token; its KV cache is kept for `rejoin`."""

    def rejoin(self, seq: Any) -> int:
        """Insert the sequence just handed off into the batch, where it stopped; its new uid."""

    def retire_lone(self, seq: Any) -> None:
        """The lone sequence stops decoding (finished, stopped or removed); its KV cache may be reused."""

    def remove(self, seq: Any) -> None:
        """Stop decoding a batch sequence; its KV cache may be reused."""

    def reset(self) -> None:
        """After a failed step: drop the lone stream and the batch."""


@dataclass(slots=True)
class StepOutput:
    """Responses to turn into text (`kind` STEP: a decode step; HAND_OFF: the lone sequence's token as it
    moves into the batch), or a failed step: `error` and the sequences it failed (the variant's others
    are untouched, as is every other variant)."""

    responses: list
    kind: str = STEP
    joined: tuple[int, ...] = ()  # batch uids that decoded while the lone stream still did
    error: Exception | None = None
    failed: tuple = ()


class VariantScheduler:
    """Admission and the lone <-> batch state of one variant. `seqs` (uid -> sequence) holds the
    sequences admitted and not finished; it is shared with the caller (the variant's `jobs`)."""

    def __init__(self, decoder: Decoder, seqs: dict[int, Any], max_batch_size: int, single_stream: bool = True
                 ) -> None:
        self.decoder = decoder
        self.seqs = seqs
        self.max_batch_size = max_batch_size
        self.single_stream = single_stream
        self.lone: Any = None  # the sequence decoding alone
        self.joining: set[int] = set()  # batch uids still in prefill while `lone` decodes
        self._handed_off: Any = None  # the lone sequence between `hand_off` and `rejoin`
        self._waiting: Any = None  # the arrival whose insert waits for a hand-off (the batch was full)

    @property
    def state(self) -> str:
        if self.lone is not None:
            return JOINING if self.joining else LONE
        return BATCH if self.seqs else IDLE

    def admit(self, seq: Schedulable, burst: bool = False) -> StepOutput | None:
        """Start `seq`: alone unless others decode here or start with it (`burst`). Returns a hand-off
        to handle first when the batch has no room for both (the insert of `seq` follows it)."""
        if not self.seqs and self.single_stream and not burst:
            seq.uid = self.decoder.start_lone(seq)
            self.lone = seq
            self.seqs[seq.uid] = seq
            return None
        if self.lone is not None and len(self.seqs) >= self.max_batch_size:
            self._waiting = seq  # no room for both: the lone stream takes its batch slot first
            return self._hand_off()
        self._insert(seq)
        return None

    def step(self) -> StepOutput | None:
        """Drop the cancelled sequences, then one decode step (None: nothing decodes here)."""
        for seq in [s for s in self.seqs.values() if s.cancelled]:
            self.remove(seq)
            seq.done = True
        if not self.seqs:
            return None
        try:
            if self.lone is None:
                return StepOutput(self.decoder.step_batch(beside_lone=False))
            responses = [self.decoder.step_lone()]
            if not self.joining:
                return StepOutput(responses)
            joined = self.decoder.step_batch(beside_lone=True)  # newcomers are prefilled in the batch meanwhile
            return StepOutput(responses + joined, joined=tuple(r.uid for r in joined))
        except Exception as e:  # e.g. out of memory: this variant's sequences fail, nothing else
            failed = tuple(self.seqs.values())
            self.seqs.clear()
            self.lone = self._handed_off = self._waiting = None
            self.joining.clear()
            self.decoder.reset()
            return StepOutput([], error=e, failed=failed)

    def start_held(self) -> None:
        """Once the caller sent the last output's tokens: start the step queued after them, if held."""
        if self.seqs:
            self.decoder.start_held()

    def update_from_output(self, output: StepOutput) -> StepOutput | None:
        """After the caller handled `output`: the next output to handle (a hand-off), or None."""
        if output.kind == HAND_OFF:
            seq, self._handed_off = self._handed_off, None
            if not seq.done and self.seqs.get(seq.uid) is seq:  # its token did not end it
                del self.seqs[seq.uid]
                seq.uid = self.decoder.rejoin(seq)
                self.seqs[seq.uid] = seq
            if self._waiting is not None:
                waiting, self._waiting = self._waiting, None
                self._insert(waiting)
            return None
        self.joining.difference_update(output.joined)
        if self.lone is not None and not self.joining and len(self.seqs) > 1:
            return self._hand_off()  # the others (all in the batch) decode: the lone stream joins them
        return None

    def finish(self, seq: Schedulable) -> None:
        """The decoder ended `seq` (end of sequence or length): forget it."""
        self.seqs.pop(seq.uid, None)
        if seq is self.lone:
            self._retire_lone()

    def remove(self, seq: Schedulable) -> None:
        """Stop decoding `seq` wherever it decodes (a stop string, a client gone, a refusal); forget it."""
        self.joining.discard(seq.uid)
        if seq is self.lone:
            self._retire_lone()
        elif seq is not self._handed_off:
            self.decoder.remove(seq)
        self.seqs.pop(seq.uid, None)

    def sequences(self, uids: Iterable[int]) -> list:
        return [seq for seq in (self.seqs.get(uid) for uid in uids) if seq is not None]

    def _insert(self, seq: Schedulable) -> None:
        seq.uid = self.decoder.insert(seq)
        if self.lone is not None:  # the lone stream joins the batch once this one decodes
            self.joining.add(seq.uid)
        self.seqs[seq.uid] = seq

    def _hand_off(self) -> StepOutput:
        self._handed_off, self.lone = self.lone, None
        self.joining.clear()
        return StepOutput([self.decoder.hand_off()], kind=HAND_OFF)

    def _retire_lone(self) -> None:
        seq, self.lone = self.lone, None
        self.joining.clear()
        self.decoder.retire_lone(seq)
