"""The dtype report's runs of a model, on the code that serves requests.

Greedy continuations and the batch-1 speed run on models.decode.single_stream.SingleStream (a lone
request's path), task prompts and the batched speed on models.mlx_lm_ext.batch_generator.LeanBatchGenerator
(the batch's path), with the engine's settings, at a variant's KV precision. Only the teacher-forced logits
are a plain forward pass (over a quantized KV cache where the precision asks, as served): the fidelity
figures compare whole sequences, which no decode path computes.

Each run is a generator that yields PART after every model call (its result is the return value), so
that the engine's worker can serve requests between two calls. Both decode paths queue the next step
before reading the current token; a timed step first waits for the step queued before it (`sync`), so
that the work of requests served in between does not count as the report's, or the report's as theirs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from models.decode.prefill import CHUNK, prefill
from models.decode.single_stream import SingleStream
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from models.mlx_lm_ext.quantized_batch_cache import quantize_layers

PART = object()  # yielded after each model call of a run: the worker may serve requests here
CHECK_EVERY = 4  # decode steps between non-finite checks, as the engine under its default `warn` policy
_UIDS = -(2**40)  # the lone stream's request ids are the engine's business; the report's are apart


def teacher_forced_logits(model: Any, seq: list[int], kv: tuple[int, int] | None = None,
                          prompt_tokens: int = 0) -> mx.array:
    """float32 logits at every position of `seq`, shape (len(seq), vocab), evaluated. With `kv` (group size,
    bits of a quantized KV cache) as served (SingleStream, mlx-lm's generate_step): the prompt but its last
    token (a prompt of up to 2,048 tokens: one chunk) attends to float keys, which are then quantized; its last
    token and the continuation attend to the quantized cache, their own keys quantized too."""
    head_tokens = max(prompt_tokens - 1, 1)  # a one-token prompt's step attends to its float key
    if kv is None or not 0 < prompt_tokens or head_tokens >= len(seq):
        out = model(mx.array(seq)[None])[0].astype(mx.float32)
        mx.eval(out)
        return out
    cache = make_prompt_cache(model)
    head = model(mx.array(seq[:head_tokens])[None], cache=cache)[0]
    quantize_layers(cache, *kv)
    tail = model(mx.array(seq[head_tokens:])[None], cache=cache)[0]
    out = mx.concatenate([head, tail]).astype(mx.float32)
    mx.eval(out)
    return out


def context_logits(model: Any, ids: list[int], context: int, kv: tuple[int, int] | None) -> Iterator[object]:
    """float32 logits of the tokens of `ids` after its first `context`, teacher-forced over a KV cache that
    holds those `context` tokens as a served request's would (prefilled in chunks, quantized after each
    with `kv`; None: the float cache): the return value, shape (len(ids) - context, vocab). Yields after
    each prefill chunk, so a long context holds the worker for one chunk at a time."""
    cache = make_prompt_cache(model)
    quantize = None if kv is None else lambda layers: quantize_layers(layers, *kv)
    for start in range(0, context, CHUNK):  # prefill's own chunks, one per call
        prefill(model, mx.array(ids[start:min(start + CHUNK, context)]), cache, False, quantize)
        yield PART
    out = model(mx.array(ids[context:])[None], cache=cache)[0].astype(mx.float32)
    mx.eval(out)
    return out


def greedy(model: Any, ids: list[int], n: int, eos: set[int], pad_prefill: bool,
           kv: tuple[int, int] | None = None) -> Iterator[object]:
    """A served greedy request's tokens after `ids`: at most n, up to and including end of sequence."""
    stream = SingleStream(model, ids, n, None, [], eos, _UIDS, pad_prefill=pad_prefill, check_every=CHECK_EVERY,
                          kv=kv)
    out: list[int] = []
    while True:
        step = stream.step()
        yield PART
        out.append(step.token)
        if step.finish_reason is not None:
            return out


def batch_greedy(model: Any, prompts: list[list[int]], max_tokens: int, eos: set[int],
                 prefill_rows: int = 8, kv: tuple[int, int] | None = None) -> Iterator[object]:
    """Greedy tokens of served batched requests, one row per prompt (end of sequence left out)."""
    generator = LeanBatchGenerator(model, check_every=CHECK_EVERY, kv=kv, stop_tokens=[[t] for t in sorted(eos)],
                                   completion_batch_size=max(len(prompts), prefill_rows),
                                   prefill_batch_size=prefill_rows)
    try:
        uids = generator.insert(prompts, max_tokens=[max_tokens] * len(prompts))
        rows: dict[int, list[int]] = {uid: [] for uid in uids}
        left = set(uids)
        while left:
            _, responses = generator.next()
            yield PART
            for r in responses:
                if r.uid in left:
                    if r.token not in eos:
                        rows[r.uid].append(r.token)
                    if r.finish_reason is not None:
                        left.discard(r.uid)
        return [rows[uid] for uid in uids]
    finally:
        generator.close()


@dataclass(frozen=True)
class SpeedRun:
    """One timed run: prefill seconds (None: not measured), decode seconds and tokens."""

    prefill_s: float | None
    decode_s: float
    decode_tokens: int


def single_speed(model: Any, ids: list[int], decode_tokens: int, pad_prefill: bool,
                 kv: tuple[int, int] | None = None) -> Iterator[object]:
    """A lone request's prefill (to its first token) and `decode_tokens` decode steps, each timed on its own."""
    t0 = time.perf_counter()
    # no stop tokens: the run is as long as asked; two spare tokens keep every timed step a queuing one
    stream = SingleStream(model, ids, decode_tokens + 2, None, [], set(), _UIDS, pad_prefill=pad_prefill,
                          check_every=CHECK_EVERY, kv=kv)
    stream.sync()
    prefill = time.perf_counter() - t0
    decode = 0.0
    for _ in range(decode_tokens):
        yield PART
        stream.sync()
        t0 = time.perf_counter()
        stream.step()  # reads the token computed before, queues the next one...
        stream.sync()  # ...and waits for it: one whole decode step
        decode += time.perf_counter() - t0
    stream.step(queue_next=False)
    yield PART
    return SpeedRun(prefill, decode, decode_tokens)


def batch_speed(model: Any, ids: list[int], batch: int, decode_tokens: int, windows: int = 1,
                warmup_steps: int = 2, kv: tuple[int, int] | None = None) -> Iterator[object]:
    """`batch` requests of the same prompt decoding together: after `warmup_steps` untimed steps, `windows`
    windows of `decode_tokens` batched steps, each step timed on its own; one SpeedRun per window (the
    return value). The rows are prefilled once, untimed (prefill depends on how requests arrive), so later
    windows attend over `decode_tokens` more positions than the one before."""
    generator = LeanBatchGenerator(model, check_every=CHECK_EVERY, kv=kv, completion_batch_size=batch,
                                   prefill_batch_size=min(8, batch))
    try:
        steps = warmup_steps + windows * decode_tokens
        generator.insert([list(ids) for _ in range(batch)], max_tokens=[steps + 4] * batch)
        decoding = 0
        while decoding < batch:  # prefill steps, until every row has its first decoded token
            _, responses = generator.next()
            decoding = len(responses)
            yield PART
        for _ in range(warmup_steps):
            generator.next()
            yield PART
        results = []
        for _ in range(windows):
            decode, tokens = 0.0, 0
            for _ in range(decode_tokens):
                generator.sync()
                t0 = time.perf_counter()
                _, responses = generator.next()
                generator.sync()
                decode += time.perf_counter() - t0
                tokens += len(responses)
                yield PART
            results.append(SpeedRun(None, decode, tokens))
        return results
    finally:
        generator.close()
