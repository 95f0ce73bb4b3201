"""A quantized checkpoint loads and serves at every dtype; its integer weights are untouched."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from models.testing.synthetic import llama_config, make_llama_checkpoint
from models.weights.loader import load_variant


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    config = llama_config(hidden=128, layers=2, vocab=64, intermediate=256)
    return make_llama_checkpoint(tmp_path_factory.mktemp("q") / "q4", config, dtype="float16", quantize_bits=4)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float32"])
def test_quantized_weights_stay_integer(quantized, dtype):
    reference = mx.load(str(quantized / "model.safetensors"))
    loaded = load_variant("q4", quantized, dtype)
    target = mx.float16 if dtype == "auto" else getattr(mx, dtype)
    params = dict(tree_flatten(loaded.model.parameters()))
    packed = [k for k in params if k.endswith(".weight") and params[k].dtype == mx.uint32]
    assert packed, "the quantized layers keep uint32 weights"
    for k in packed:
        assert mx.array_equal(params[k], reference[k]).item()
    for k, v in params.items():
        if mx.issubdtype(v.dtype, mx.floating):
            assert v.dtype == target, k
    assert set(loaded.stats.bytes_by_dtype) == {"uint32", {"auto": "float16"}.get(dtype, dtype)}
    # and it generates
    from mlx_lm import generate

    text = generate(loaded.model, loaded.tokenizer, prompt="1+1=", max_tokens=4)
    assert isinstance(text, str)
