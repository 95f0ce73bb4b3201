"""Generate llama checkpoints in the mlx-lm layout, with random weights, for tests and benchmarks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from models.weights.dtypes import mx_dtype

BUNDLED = Path(__file__).resolve().parent.parent / "bundled" / "tiny-arith"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llama_config(hidden: int, layers: int, vocab: int, intermediate: int | None = None,
                 heads: int | None = None, context: int = 2048) -> dict:
    heads = heads or max(1, hidden // 64)
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": intermediate or int(hidden * 8 / 3) // 64 * 64 or hidden,
        "num_attention_heads": heads, "num_key_value_heads": heads, "rms_norm_eps": 1e-5,
        "vocab_size": vocab, "max_position_embeddings": context, "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def make_llama_checkpoint(folder: Path, config: dict, dtype: str = "float32", seed: int = 0,
                          quantize_bits: int | None = None, tokenizer_from: Path = BUNDLED,
                          extra_config: dict | None = None) -> Path:
    """Write a random llama to `folder`. Arrays are built and saved layer by layer to bound memory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantize_bits:
        import mlx.nn as nn

        nn.quantize(model, group_size=64, bits=quantize_bits)
        config = {**config, "quantization": {"group_size": 64, "bits": quantize_bits}}
    target = mx_dtype(dtype)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            # small scale keeps activations finite in every dtype
            value = (value * 0.5).astype(target)
        weights[name] = value
    mx.eval(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    del weights, model
    full = {**config, "torch_dtype": dtype, **(extra_config or {})}
    tok_config = json.loads((tokenizer_from / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        if key in tok_config:
            full.setdefault(key, tok_config[key])
    (folder / "config.json").write_text(json.dumps(full, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    if config["vocab_size"] > _tokenizer_size(folder):
        pad_tokenizer(folder, config["vocab_size"])
    return folder


def _tokenizer_size(folder: Path) -> int:
    return len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])


def pad_tokenizer(folder: Path, vocab_size: int) -> None:
    """Grow the character tokenizer to `vocab_size` with placeholder tokens `<|tN|>`, so every id
    a model with a larger vocabulary samples decodes to text (speed tests with real vocab sizes)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|t{i}|>"] = i
    (folder / "tokenizer.json").write_text(json.dumps(data))
