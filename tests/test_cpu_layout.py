"""float32 Linear weights on the CPU (models.decode.cpu_layout): row-major under the forwarding BLAS, else
column-major, applied while loading and deriving, only to float32, with mlx-lm's tokens and its logits within
float32 rounding either way."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

import models.decode.cpu_layout as cpu_layout
from models.decode.cpu_layout import laid_out, linear_weight_paths
from models.platform.quantized_kernel import quantized_kernel
from models.weights.loader import derive_variant, load_variant
from tests.conftest import BUNDLED

pytestmark = pytest.mark.skipif(mx.default_device().type != mx.cpu, reason="the layout applies to the CPU only")


def column_major(a: mx.array) -> bool:
    itemsize = a.dtype.size
    return memoryview(a).strides == (itemsize, a.shape[0] * itemsize)


def row_major(a: mx.array) -> bool:
    itemsize = a.dtype.size
    return memoryview(a).strides == (a.shape[1] * itemsize, itemsize)


@pytest.mark.parametrize("source", [mx.float32, mx.bfloat16])
def test_laid_out_gives_float32_column_major_and_16_bit_row_major(source):
    weight = mx.random.normal((48, 32), key=mx.random.key(0)).astype(source)
    as_float32 = laid_out(weight, None if source == mx.float32 else mx.float32)
    mx.eval(as_float32)
    assert column_major(as_float32) and as_float32.shape == weight.shape
    assert mx.array_equal(as_float32, weight.astype(mx.float32)).item()
    again = laid_out(as_float32, None)  # a resident float32 weight, derived again
    half = laid_out(as_float32, mx.float16)
    mx.eval(again, half)
    assert column_major(again) and row_major(half)
    assert mx.array_equal(half, weight.astype(mx.float16)).item()


@pytest.fixture
def without_forwarding(monkeypatch):
    """As where the forwarding BLAS is not MLX's (no C compiler, another BLAS): column-major float32 weights."""
    monkeypatch.setattr(cpu_layout, "quantized_kernel", lambda: None)


def test_float32_weights_stay_row_major_exactly_under_the_forwarding_blas():
    fp32 = load_variant("tiny", BUNDLED, "float32")
    weights = linear_weights(fp32.model)
    forwarding = quantized_kernel() is not None  # a C compiler built it here (CI: yes)
    assert all(row_major(w) if forwarding else column_major(w) for w in weights)
    assert (linear_weight_paths(fp32.model) == frozenset()) == forwarding


def linear_weights(model: nn.Module) -> list[mx.array]:
    """Linear weights, and the embedding: the bundled model's output layer is its embedding (tied)."""
    return [m.weight for _, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]


def test_loaded_and_derived_variants_lay_out_their_linear_weights_by_dtype(without_forwarding):
    fp32 = load_variant("tiny", BUNDLED, "float32")
    weights = linear_weights(fp32.model)
    assert weights and len(weights) == len(linear_weight_paths(fp32.model))
    assert all(column_major(w) for w in weights)
    assert any(type(m) is nn.Embedding for _, m in fp32.model.named_modules())
    bf16 = derive_variant(fp32, "bfloat16")
    assert all(row_major(w) for w in linear_weights(bf16.model))
    back = derive_variant(bf16, "float32")
    assert all(column_major(w) for w in linear_weights(back.model))
    for a, b in zip(weights, linear_weights(back.model), strict=True):
        assert mx.array_equal(a, b).item()


def test_an_untied_models_embedding_keeps_its_layout(without_forwarding):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                           num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=100, tie_word_embeddings=False)
    paths = linear_weight_paths(llama.Model(args))
    assert "lm_head.weight" in paths and "model.layers.0.mlp.down_proj.weight" in paths
    assert "model.embed_tokens.weight" not in paths
    tied = linear_weight_paths(llama.Model(llama.ModelArgs(**{**args.__dict__, "tie_word_embeddings": True})))
    assert "model.embed_tokens.weight" in tied


@pytest.mark.parametrize("layout", ["column-major", "as loaded here"])
def test_a_model_computes_mlx_lms_tokens_and_logits_within_rounding(layout, request):
    # BLAS kernels may sum the two layouts' products in another order (OpenBLAS's AVX-512 ones do:
    # ~5e-6 on logits of ~14), and the forwarding BLAS's few-row product sums in its own order, so equality
    # holds only on some CPUs; a few float32 ulps hold on all.
    if layout == "column-major":
        request.getfixturevalue("without_forwarding")
    ours = load_variant("tiny", BUNDLED, "float32")
    theirs, tokenizer = load(str(BUNDLED))
    theirs.set_dtype(mx.float32)
    caches = [make_prompt_cache(m) for m in (ours.model, theirs)]
    tokens = mx.array([tokenizer.encode("12+30=")])
    for _ in range(6):  # the prompt, then one token at a time
        a, b = (m(tokens, cache=c) for m, c in zip((ours.model, theirs), caches, strict=True))
        ulp = float(mx.finfo(mx.float32).eps) * mx.abs(b).max().item()
        assert mx.abs(a - b).max().item() <= 64 * ulp
        assert mx.array_equal(mx.argmax(a, axis=-1), mx.argmax(b, axis=-1)).item()
        tokens = mx.argmax(a[:, -1:], axis=-1)
