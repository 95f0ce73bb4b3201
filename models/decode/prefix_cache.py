"""Reuse of the KV cache of earlier requests that share a prompt prefix (system prompts, chat
history, retries), on mlx-lm's LRUPromptCache: a request prefills only the tokens it does not
share with a finished one.

One per variant, bounded in bytes; the registry counts these bytes against the memory budget
and drops them before it evicts a variant. Entries are kept per scope (a tenant, a salt): a request
reuses only what requests of its own scope stored, so `cached_tokens` tells nothing of the others.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

# Shorter shared prefixes (a BOS token, a few words) are prefilled instead: a copy of a stored
# cache costs more than they save, and on CUDA a prefill after a reused prefix is a new shape.
MIN_REUSE = 16


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = 64) -> None:
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self.hits = 0
        self.cached_tokens = 0  # prompt tokens served from the cache, all requests

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)

    def fetch(self, tokens: list[int], scope: str = "") -> tuple[list[Any] | None, int]:
        """A copy of the cache of the longest prefix of `tokens` stored in `scope` and its length: a
        prefix of MIN_REUSE tokens or more, or the whole prompt. At least the last prompt token is left
        to compute: its logits start the generation."""
        if not self.enabled:
            return None, 0
        # LRUPromptCache keys its trie by "model": one trie per scope, so scopes never share a prefix
        cache, rest = self._lru.fetch_nearest_cache(scope, tokens)
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt is cached: recompute its last token
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        reused = len(tokens) - len(rest)
        if reused < min(MIN_REUSE, len(tokens) - 1):
            return None, 0
        self.hits += 1
        self.cached_tokens += reused
        return cache, reused

    def store(self, tokens: list[int], cache: list[Any], scope: str = "") -> None:
        """Keep `cache`, which holds the keys and values of exactly `tokens`, for requests of `scope`."""
        if self.enabled and tokens and cache:
            # evaluated now: a row extracted from a batch is a lazy copy that holds the batch's whole buffers
            mx.eval([c.state for c in cache])
            self._lru.insert_cache(scope, list(tokens), cache)

    def clear(self) -> int:
        """Drop every entry; the bytes freed."""
        freed = self.nbytes
        self._lru.trim_to(n_sequences=0)
        return freed

    def describe(self) -> dict:
        return {"entries": len(self), "bytes": self.nbytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "cached_tokens": self.cached_tokens}
