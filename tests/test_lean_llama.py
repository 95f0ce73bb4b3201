"""The lean llama and qwen2 decode step on the CPU (models.mlx_lm_ext.lean_llama): mlx-lm's tokens and logits
within float rounding, in half as many graph nodes, with the model's parameters untouched."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2
from mlx_lm.models.cache import make_prompt_cache

from models.decode.cpu_fusion import FusedRoPE
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from models.mlx_lm_ext.lean_llama import (
    LEAN_CLASSES,
    LONG_ATTENTION,
    LeanLlama,
    LeanQwen2,
    RopeTables,
    lean_decode_on_cpu,
)
from models.testing.synthetic import llama_config, make_llama_checkpoint
from models.testing.synthetic_archs import make_checkpoint
from models.weights.loader import load_variant
from tests.conftest import BUNDLED

pytestmark = pytest.mark.skipif(mx.default_device().type != mx.cpu, reason="the lean step applies to the CPU only")
PROMPTS = [[5, 17, 33, 8, 61, 2 + i, 40][: 4 + i] for i in range(4)]  # different lengths: padded rows


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("offset", [0, 123, 4095, "rows"])
def test_rope_tables_rotate_as_mlx_fast_rope(dtype, traditional, offset):
    rows, heads, dims = 4, 3, 64
    x = mx.random.normal((rows, heads * dims), key=mx.random.key(7)).astype(dtype)
    rope = nn.RoPE(dims, traditional=traditional, base=10000.0)
    offsets = mx.array([5, 100, 3000, 0]) if offset == "rows" else offset
    want = rope(x.reshape(rows, heads, 1, dims), offset=offsets)
    got = RopeTables(rope, offsets, dtype).apply(x, heads)
    assert got.shape == want.shape and got.dtype == want.dtype
    # the same products and sums; a compiler may contract another of them into a fused multiply-add
    ulp = 2.0 ** -23 if dtype == mx.float32 else 2.0 ** -7
    assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), rtol=2 * ulp, atol=4 * ulp).item()


def _logits_and_tokens(model, prompt: list[int], steps: int) -> tuple[list[mx.array], list[int]]:
    """Greedy decoding with a plain KV cache, as a lone stream does."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    out, tokens = [], []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], cache=cache)[:, -1, :]
        out.append(logits.astype(mx.float32))
    return out, tokens


def _batch_tokens(model, prompts: list[list[int]] = PROMPTS, steps: int = 10) -> dict[int, list[int]]:
    gen = LeanBatchGenerator(model, max_tokens=steps, completion_batch_size=4, prefill_batch_size=4)
    uids = gen.insert(prompts, max_tokens=[steps] * len(prompts))
    out, done = {uid: [] for uid in uids}, 0
    while done < len(uids):
        for response in gen.next_generated():
            out[response.uid].append(response.token)
            done += response.finish_reason is not None
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    gqa = make_checkpoint(root / "gqa", "llama")  # 4 heads, 2 KV heads, untied head
    traditional = make_llama_checkpoint(root / "traditional", llama_config(hidden=128, layers=2, vocab=100, heads=2),
                                        extra_config={"rope_traditional": True})
    qwen = make_checkpoint(root / "qwen2", "qwen2")  # biased query, key and value projections; tied head
    return {"bundled": BUNDLED, "gqa": gqa, "traditional": traditional, "qwen2": qwen}


def _plain(model) -> None:
    """Back to mlx-lm's own class."""
    model.__class__ = next(plain for plain, lean in LEAN_CLASSES.items() if lean is type(model))


@pytest.mark.parametrize("name,precision", [("bundled", "float32"), ("bundled", "bfloat16"), ("gqa", "float32"),
                                            ("gqa", "q4"), ("gqa", "q8:float32"), ("traditional", "float32"),
                                            ("qwen2", "float32"), ("qwen2", "bfloat16"), ("qwen2", "q4")])
def test_the_lean_step_decodes_mlx_lms_tokens_and_logits(folders, name, precision):
    model = load_variant("m", folders[name], precision).model
    assert type(model) is (LeanQwen2 if name == "qwen2" else LeanLlama)
    lean_logits, lean_tokens = _logits_and_tokens(model, [5, 17, 33, 8], 12)
    lean_batch = _batch_tokens(model)
    _plain(model)
    logits, tokens = _logits_and_tokens(model, [5, 17, 33, 8], 12)
    assert lean_tokens == tokens
    assert _batch_tokens(model) == lean_batch
    tolerance = 1e-5 if precision.endswith("float32") else 2e-2  # relative to the largest score
    for got, want in zip(lean_logits, logits, strict=True):
        scale = mx.abs(want).max().item()
        assert mx.abs(got - want).max().item() <= tolerance * scale


def _long_prompts(count: int, vocab: int = 100) -> list[list[int]]:
    """Prompts past LONG_ATTENTION positions, of different lengths (batched: padded rows and a mask)."""
    return [[(7 * i + 3 * j) % (vocab - 5) + 5 for i in range(LONG_ATTENTION + 40 + 300 * j)] for j in range(count)]


@pytest.mark.parametrize("name", ["bundled", "gqa"])
def test_attention_over_a_long_context_decodes_mlx_lms_tokens_and_logits_in_fused_kernels(folders, tmp_path, name):
    model = load_variant("m", folders[name], "float32").model
    prompt = _long_prompts(1)[0]
    lean_logits, lean_tokens = _logits_and_tokens(model, prompt, 6)
    cache = make_prompt_cache(model)
    model(mx.array([prompt]), cache=cache)
    mx.export_to_dot(str(tmp_path / "long.dot"), model(mx.array([[9]]), cache=cache))
    assert "Exp" in (tmp_path / "long.dot").read_text()  # the fused softmax (MLX's own is one Softmax node)
    lean_batch = _batch_tokens(model, _long_prompts(2), 4)
    _plain(model)
    logits, tokens = _logits_and_tokens(model, prompt, 6)
    assert lean_tokens == tokens and _batch_tokens(model, _long_prompts(2), 4) == lean_batch
    for got, want in zip(lean_logits, logits, strict=True):
        assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()


def test_a_quantized_kv_cache_decodes_mlx_lms_tokens(folders):
    model = load_variant("m", folders["bundled"], "float32").model  # heads of 32: one group each

    def decode() -> list[int]:
        cache = [c.to_quantized(group_size=32, bits=8) for c in make_prompt_cache(model)]
        model(mx.array([[5, 17, 33]]), cache=cache)  # prefill fills the cache, as mlx-lm's generate does
        token, out = mx.array([[8]]), []
        for _ in range(8):
            token = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)[:, None]
            out.append(token.item())
        return out

    lean = decode()
    model.__class__ = llama.Model
    assert decode() == lean


def _graph_nodes(model, tmp_path) -> int:
    cache = make_prompt_cache(model)
    model(mx.array([[5, 17, 33, 8]]), cache=cache)
    mx.eval(model(mx.array([[9]]), cache=cache))  # the first step evaluates the weights' transposes
    mx.export_to_dot(str(tmp_path / "step.dot"), model(mx.array([[9]]), cache=cache))
    return len(re.findall(r'label ="', (tmp_path / "step.dot").read_text()))


@pytest.mark.parametrize("name", ["gqa", "qwen2"])
def test_a_lean_step_has_at_most_two_thirds_of_mlx_lms_graph_nodes(folders, tmp_path, name):
    # 2 layers: a step's fixed nodes (RoPE's tables, the head) weigh more than in llama-25m (313 of 641)
    model = load_variant("m", folders[name], "float32").model
    lean = _graph_nodes(model, tmp_path)
    _plain(model)
    plain = _graph_nodes(model, tmp_path)
    assert lean <= 2 / 3 * plain, (lean, plain)


def test_the_model_keeps_its_parameters_and_a_replaced_weight_is_used(folders):
    model = load_variant("m", folders["bundled"], "float32").model
    before = [name for name, _ in tree_flatten(model.parameters())]
    _logits_and_tokens(model, [5, 17], 2)
    assert [name for name, _ in tree_flatten(model.parameters())] == before
    layer = model.model.layers[0].self_attn
    layer.o_proj.weight = layer.o_proj.weight * 0.5  # a new array: the transpose made from the old one is stale
    lean, _ = _logits_and_tokens(model, [5, 17], 3)
    model.__class__ = llama.Model
    plain, _ = _logits_and_tokens(model, [5, 17], 3)
    for got, want in zip(lean, plain, strict=True):
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


def test_only_mlx_lms_llama_and_qwen2_on_the_cpu_get_the_lean_step(folders, tmp_path):
    model = load_variant("m", folders["bundled"], "float32").model
    assert type(model) is LeanLlama and not lean_decode_on_cpu(model)  # once only
    qwen = load_variant("m", make_checkpoint(tmp_path / "qwen3", "qwen3"), "float32").model
    assert not isinstance(qwen, (LeanLlama, LeanQwen2))
    qwen = load_variant("m", folders["qwen2"], "float32").model
    assert type(qwen) is LeanQwen2
    qwen.__class__ = qwen2.Model
    del qwen.model.pipeline_size  # another mlx-lm's qwen2: its step is left alone
    assert not lean_decode_on_cpu(qwen) and type(qwen) is qwen2.Model
    model.__class__ = llama.Model
    del model.model.layers[1].self_attn.n_kv_heads  # another mlx-lm's llama: its step is left alone
    assert not lean_decode_on_cpu(model) and type(model) is llama.Model


def test_rope_kinds_it_does_not_know_keep_their_own_code(folders):
    model = load_variant("m", folders["bundled"], "float32").model
    for layer in model.model.layers:
        assert type(layer.self_attn.rope) is FusedRoPE

    class ScaledRoPE(nn.RoPE):  # a subclass may compute anything: each layer calls it
        calls = 0

        def __call__(self, x, offset=0):
            ScaledRoPE.calls += 1
            return super().__call__(x, offset)

    for layer in model.model.layers:
        layer.self_attn.rope.__class__ = ScaledRoPE
    lean, _ = _logits_and_tokens(model, [5, 17], 2)
    assert ScaledRoPE.calls == 2 * 2 * len(model.model.layers) + 2 * len(model.model.layers)  # 2 steps + prefill
    model.__class__ = llama.Model
    plain, _ = _logits_and_tokens(model, [5, 17], 2)
    for got, want in zip(lean, plain, strict=True):
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
