"""A variant's KV cache, counted: the live bytes of every sequence (the lone stream's and the batch's),
what one more token costs at its KV precision, and the growth admission must reserve: a request's cache
grows to prompt + max_tokens tokens, its buffers to that rounded up to the caches' step (256 positions), and
each running sequence is promised what its buffers will still add (grown from the room they have now, its
left padding in a batch counted).

What the reservation does not foresee, and so the slack above the budget:
- padding a row gets after it was admitted. A batch's rows share one length, that of its longest: a row that
  joins a batch whose write index is d positions past its own length is left-padded by d, and a row that
  joins d positions longer pads every row already there by d. Each padded row's buffers may then reach d more
  positions, rounded up to the step, than it reserved; also after the batch drops the padding its rows share
  (mlx-lm cuts the buffers from the front, and they grow by whole steps from there).
- a cache reused from the prompt cache, prefilled into buffers it already has: mlx-lm grows those from their
  end when the write index is a whole step (from the write index otherwise), so it may take up to the room it
  had beyond its tokens, plus a step, more than reserved.
The count is exact for a cache built from empty (prefill's chunks of 2,048, then token by token) and for one
decoding token by token from the buffers it has.
"""

from __future__ import annotations

from typing import Any

from models.mlx_lm_ext.kv_usage import (
    CACHE_STEP,
    SequenceKV,
    batch_sequences,
    grown_room,
    layer_bytes,
    layer_room,
    lone_tokens,
)
from models.weights.dtypes import KV_FLOAT, split_kv
from models.weights.estimate import kv_bytes_per_token


def variant_sequences(variant: Any) -> list[SequenceKV]:
    """Every sequence of a variant holding a KV cache: its lone stream, and the batch's rows."""
    out = []
    scheduler = variant.scheduler  # models.engine.scheduler: its decoder holds the lone stream
    single = getattr(scheduler.decoder, "single", None) if scheduler is not None else None
    if single is not None:
        out.append(SequenceKV(single.uid, lone_tokens(single.cache), sum(layer_bytes(c) for c in single.cache),
                              "lone", room=layer_room(single.cache[0]) if single.cache else 0))
    if variant.generator is not None:
        out += batch_sequences(variant.generator)
    return out


def live_kv_bytes(variant: Any) -> int:
    """Bytes of the KV cache arrays of all of a variant's running sequences."""
    return sum(s.bytes for s in variant_sequences(variant))


def per_token_bytes(variant: Any) -> int:
    """What one more token of one sequence costs this variant's KV cache, at its KV precision."""
    loaded = variant.loaded
    return kv_bytes_per_token(loaded.config, loaded.float_dtype, variant.kv[1] if variant.kv else None)


def kv_growth(variant: Any, prompt_tokens: int, max_tokens: int) -> int:
    """Bytes a new request's KV cache reaches at prompt + max_tokens tokens: its buffers' size then, the
    tokens rounded up to the caches' step (what admission must find free)."""
    return per_token_bytes(variant) * grown_room(0, prompt_tokens + max_tokens)


def tokens_within(room_bytes: int, per_token: int) -> int:
    """The most tokens one sequence's cache can hold in `room_bytes`: its buffers' whole steps that fit."""
    return max(room_bytes, 0) // (per_token * CACHE_STEP) * CACHE_STEP if per_token else 0


def promised_growth(variant: Any, targets: dict[int, int]) -> int:
    """Bytes the running sequences' caches may still grow by: for each sequence uid in `targets` (its
    prompt + max_tokens), its buffers' room when it holds them (its left padding in a batch included) less
    the room they have now (counted live), at the variant's per-token cost; from empty for one holding none."""
    now = {s.uid: s for s in variant_sequences(variant)}
    cost = per_token_bytes(variant)
    total = 0
    for uid, target in targets.items():
        seq = now.get(uid)
        room, padding = (seq.room, seq.padding) if seq is not None else (0, 0)
        total += (grown_room(room, padding + target) - room) * cost
    return total


def sequence_targets(variant: Any) -> dict[int, int]:
    """Each running sequence's uid and the tokens its KV cache may reach: its prompt + max_tokens."""
    return {uid: seq.prompt_tokens + seq.max_tokens for uid, seq in variant.jobs.items()}


def reserved_bytes(variant: Any) -> int:
    """What the budget keeps for the variant's running sequences beyond their live caches (their growth)."""
    return promised_growth(variant, sequence_targets(variant)) if variant.jobs else 0


def describe_kv(variant: Any) -> dict:
    """/memory's `kv_cache` of a variant: its precision, per-token cost, live bytes, the bytes reserved for
    the running sequences' growth, and per sequence."""
    sequences = variant_sequences(variant)
    group, bits = variant.kv if variant.kv else (None, None)
    return {
        "dtype": split_kv(variant.loaded.dtype)[1] or KV_FLOAT, "bits": bits, "group_size": group,
        "float_dtype": variant.loaded.float_dtype, "bytes_per_token": per_token_bytes(variant),
        "live_bytes": sum(s.bytes for s in sequences), "reserved_bytes": reserved_bytes(variant),
        "tokens": sum(s.tokens for s in sequences),
        "sequences": [{"tokens": s.tokens, "bytes": s.bytes, "stage": s.stage, "padding": s.padding}
                      for s in sequences],
    }
