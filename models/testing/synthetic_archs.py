"""Tiny random checkpoints, in the mlx-lm layout, of the architectures users serve (the conformance suite).

Each config is as small as its model class allows (hidden 64, 2-4 layers, the bundled character
tokenizer's 100 tokens) but keeps what makes the architecture itself: grouped KV heads, q/k norms,
gemma3's sliding-window layers (a window of 8 tokens, so requests cross it), mixtures of experts.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from models.testing.synthetic import BUNDLED, TOKENIZER_FILES

# untied heads but qwen2's: a random tied model mostly repeats its input's last token
_COMMON = {"tie_word_embeddings": False, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 100,
           "max_position_embeddings": 256, "rope_theta": 10000.0}

TINY_CONFIGS: dict[str, dict] = {
    "llama": {**_COMMON},
    "qwen2": {**_COMMON, "tie_word_embeddings": True},
    "qwen3": {**_COMMON, "head_dim": 16},
    "gemma3_text": {**_COMMON, "num_hidden_layers": 4, "head_dim": 16, "query_pre_attn_scalar": 16,
                    "sliding_window": 8, "sliding_window_pattern": 2, "rms_norm_eps": 1e-6},
    "phi3": {**_COMMON},
    "mixtral": {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {**_COMMON, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "moe_intermediate_size": 64, "norm_topk_prob": True},
    "olmo2": {**_COMMON},
    "granite": {**_COMMON, "logits_scaling": 2.0, "attention_multiplier": 0.25, "embedding_multiplier": 4.0,
                "residual_multiplier": 0.5, "attention_bias": False, "mlp_bias": False},
}
# MLX's CPU gather_mm (the experts' matmul) runs in float32 only
MIXTURES_OF_EXPERTS = frozenset({"mixtral", "qwen3_moe"})


def make_checkpoint(folder: Path, model_type: str, seed: int = 0) -> Path:
    """Write a random float32 `model_type` model from TINY_CONFIGS to `folder`, with the bundled tokenizer."""
    config = {"model_type": model_type, **TINY_CONFIGS[model_type]}
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # the final norm scaled up from mlx's initialisation, so that the next-token argmax is rarely a near-tie
    weights = {name: (value * 4.0 if name == "model.norm.weight" else value)
               for name, value in tree_flatten(model.parameters())}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    tokenizer = json.loads((BUNDLED / "config.json").read_text())
    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    config.update({k: tokenizer[k] for k in special if k in tokenizer}, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (BUNDLED / name).exists():
            shutil.copy(BUNDLED / name, folder / name)
    return folder
