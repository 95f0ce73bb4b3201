"""Every private (or version-bound) name of mlx-lm that models.mlx_lm_ext relies on, and the check of it.

Names are "module:object.attribute" paths, resolved without building a model. Attributes that exist
only on instances are listed apart and checked where an instance is first made (batch_generator).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

PINNED = "0.32.2"

# Classes and functions imported or subclassed, and the methods overridden or called
NAMES = (
    "mlx_lm.generate:BatchGenerator", "mlx_lm.generate:BatchGenerator._next",
    "mlx_lm.generate:BatchGenerator._make_batch", "mlx_lm.generate:BatchGenerator.insert",
    "mlx_lm.generate:GenerationBatch", "mlx_lm.generate:GenerationBatch._step",
    "mlx_lm.generate:GenerationBatch.extend", "mlx_lm.generate:GenerationBatch.filter",
    "mlx_lm.generate:GenerationBatch.next",
    "mlx_lm.generate:PromptProcessingBatch", "mlx_lm.generate:PromptProcessingBatch.split",
    "mlx_lm.generate:StopSequences", "mlx_lm.generate:generation_stream",
    "mlx_lm.models.cache:BatchKVCache", "mlx_lm.models.cache:BatchKVCache.make_mask",
    "mlx_lm.models.cache:BatchKVCache.prepare", "mlx_lm.models.cache:BatchKVCache.finalize",
    "mlx_lm.models.cache:BatchKVCache.filter", "mlx_lm.models.cache:BatchKVCache.extend",
    "mlx_lm.models.cache:BatchKVCache.state", "mlx_lm.models.cache:KVCache",
    # the quantized batch cache (quantized_batch_cache): its base, the roll it shares, its lone form
    "mlx_lm.models.cache:dynamic_roll", "mlx_lm.models.cache:QuantizedKVCache",
    "mlx_lm.models.cache:KVCache.to_quantized", "mlx_lm.generate:PromptProcessingBatch.prompt",
    "mlx_lm.generate:PromptProcessingBatch.extend", "mlx_lm.generate:PromptProcessingBatch._copy",
    "mlx_lm.utils:_get_classes",
    # the lean llama and qwen2 decode step on the CPU (lean_llama): the class it extends, what its step calls
    "mlx_lm.models.llama:Model", "mlx_lm.models.llama:MLP", "mlx_lm.models.activations:swiglu",
    "mlx_lm.models.qwen2:Model", "mlx_lm.models.qwen2:MLP",
    "mlx_lm.models.base:create_attention_mask", "mlx_lm.models.base:scaled_dot_product_attention",
    # replaced on CUDA (quantized_attention)
    "mlx_lm.models.base:quantized_scaled_dot_product_attention",
    # the caches' growth in steps, which the KV admission reserves (kv_usage.CACHE_STEP, grown_room)
    "mlx_lm.models.cache:KVCache.step", "mlx_lm.models.cache:BatchKVCache.step",
    "mlx_lm.models.cache:QuantizedKVCache.step",
)
# Instance attributes of GenerationBatch that LeanGenerationBatch._step reads and writes
GENERATION_BATCH_ATTRIBUTES = (
    "uids", "tokens", "prompt_cache", "samplers", "fallback_sampler", "logits_processors", "max_tokens",
    "_num_tokens", "_current_tokens", "_current_logprobs", "_next_tokens", "_next_logprobs", "_token_context")
# Instance attributes read elsewhere: BatchGenerator's queue of prompts (a deque of tuples whose 4th item
# is a sequence's cache), its prompt batch; BatchKVCache's write index
OTHER_INSTANCE_ATTRIBUTES = ("BatchGenerator._unprocessed_sequences", "BatchGenerator._prompt_batch",
                             "BatchGenerator._generation_batch", "BatchKVCache._idx",
                             "BatchKVCache._right_padding", "TokenizerWrapper._tokenizer")


def _resolves(path: str) -> bool:
    module_name, _, dotted = path.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError:
        return False
    for part in dotted.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


@dataclass(frozen=True)
class ContractReport:
    """The installed mlx-lm against the one the extension was written for."""

    version: str
    pinned: str
    missing: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"version": self.version, "pinned": self.pinned, "missing": list(self.missing)}


def check_contract() -> ContractReport:
    """Which of NAMES the installed mlx-lm lacks (each one falls back, see docs/mlx-lm.md)."""
    try:
        installed = version("mlx-lm")
    except PackageNotFoundError:
        installed = "unknown"
    return ContractReport(installed, PINNED, tuple(n for n in NAMES if not _resolves(n)))
