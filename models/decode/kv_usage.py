"""A variant's KV cache, counted: the live bytes of every sequence (the lone stream's and the batch's),
what one more token costs at its KV precision, and the growth admission must reserve (a request's cache
grows to prompt + max_tokens tokens; running sequences have been promised theirs)."""

from __future__ import annotations

from typing import Any

from models.mlx_lm_ext.kv_usage import SequenceKV, batch_sequences, layer_bytes, lone_tokens
from models.weights.dtypes import KV_FLOAT, split_kv
from models.weights.estimate import kv_bytes_per_token


def variant_sequences(variant: Any) -> list[SequenceKV]:
    """Every sequence of a variant holding a KV cache: its lone stream, and the batch's rows."""
    out = []
    scheduler = variant.scheduler  # models.engine.scheduler: its decoder holds the lone stream
    single = getattr(scheduler.decoder, "single", None) if scheduler is not None else None
    if single is not None:
        out.append(SequenceKV(single.uid, lone_tokens(single.cache), sum(layer_bytes(c) for c in single.cache),
                              "lone"))
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
    """Bytes a new request's KV cache reaches at prompt + max_tokens tokens (what admission must find free)."""
    return per_token_bytes(variant) * (prompt_tokens + max_tokens)


def promised_growth(variant: Any, targets: dict[int, int]) -> int:
    """Bytes the running sequences' caches may still grow by: for each sequence uid in `targets` (its
    prompt + max_tokens), the tokens it does not hold yet, at the variant's per-token cost."""
    held = {s.uid: s.tokens for s in variant_sequences(variant)}
    cost = per_token_bytes(variant)
    return sum(max(target - held.get(uid, 0), 0) * cost for uid, target in targets.items())


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
        "sequences": [{"tokens": s.tokens, "bytes": s.bytes, "stage": s.stage} for s in sequences],
    }
