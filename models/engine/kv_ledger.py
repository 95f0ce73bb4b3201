"""The KV admission's ledger over the registry (models.engine.kv_admission.Ledger): a request's KV growth at
its variant's KV precision, the budget's figures, the room made by shrinking prompt caches and evicting."""

from __future__ import annotations

from models.decode.kv_usage import CACHE_STEP, grown_room, kv_growth, per_token_bytes, tokens_within
from models.engine.kv_admission import BudgetView, Verdict
from models.engine.sequence import Sequence
from models.errors import KVBudgetError, MemoryBudgetError
from models.weights.registry import Variant, VariantRegistry


class RegistryLedger:
    """models.engine.kv_admission.Ledger of Sequences (admitted to a variant: tokens and max_tokens known)."""

    def __init__(self, registry: VariantRegistry) -> None:
        self.registry = registry

    def need(self, seq: Sequence) -> int:
        return kv_growth(seq.variant, seq.prompt_tokens, seq.max_tokens)

    def view(self, seq: Sequence) -> BudgetView:
        registry = self.registry
        reclaimable = registry.prompt_cache_used() + sum(
            v.loaded.stats.final_bytes for v in registry.evictable(keep=seq.variant))
        return BudgetView(budget=registry.budget_bytes, held=registry.used_bytes(),
                          promised=registry.kv_cache_reserved(), reclaimable=reclaimable,
                          floor=registry.floor_bytes(seq.variant))

    def make_room(self, seq: Sequence, need: int) -> None:
        self.registry.make_room(need, keep=seq.variant)

    def most_tokens(self, variant: Variant) -> int:
        """The most tokens one sequence's KV cache of `variant` could ever hold in the budget (nothing else
        running, only the pinned variants and its own weights resident), in whole steps of its buffers."""
        return tokens_within(self.registry.budget_bytes - self.registry.floor_bytes(variant), per_token_bytes(variant))

    def running(self) -> bool:
        return any(v.jobs for v in self.registry.variants.values())


def refusal(seq: Sequence, verdict: Verdict) -> Exception:
    """The error a refused request gets: 400 if it could never fit (with the max_tokens that would), else a
    503 to retry (it would fit alone, but what else waits for memory keeps it out now)."""
    per_token = per_token_bytes(seq.variant)
    tokens = seq.prompt_tokens + seq.max_tokens
    most = verdict.view.most
    what = (f"this request's KV cache ({seq.prompt_tokens} prompt + {seq.max_tokens} max_tokens = {tokens} tokens, "
            f"in buffers of {grown_room(0, tokens)} positions (steps of {CACHE_STEP}) x {per_token} bytes at "
            f"{seq.variant.loaded.dtype} = {verdict.need} bytes)")
    if verdict.need > most:
        fitting = max(tokens_within(most, per_token) - seq.prompt_tokens, 0)
        hint = (f"; max_tokens of at most {fitting} would fit" if fitting else
                "; a shorter prompt is needed" if tokens_within(most, per_token) else
                f"; not even one step of {CACHE_STEP} positions fits")
        return KVBudgetError(f"{what} cannot fit the memory budget: at most {max(most, 0)} bytes are left beside "
                             f"the weights{hint}", required_bytes=verdict.need, available_bytes=max(most, 0),
                             max_tokens_fitting=fitting)
    return MemoryBudgetError(f"{what} does not fit the memory budget now ({verdict.view.free} bytes free), and "
                             "nothing running here will free more; retry shortly",
                             required_bytes=verdict.need, available_bytes=verdict.view.free,
                             dtype=seq.variant.loaded.dtype, retry=True)
