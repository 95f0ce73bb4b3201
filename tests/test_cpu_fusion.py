"""Fused RMSNorm and RoPE on the CPU (models.decode.cpu_fusion): bitwise MLX's own results, in every dtype,
and a fused model decodes the same tokens and logits as mlx-lm's model left as it is."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator

from models.decode.cpu_fusion import FusedRMSNorm, FusedRoPE, compiles_on_cpu, fuse_for_cpu, fused_rms_norm, fused_rope
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from tests.conftest import BUNDLED

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
pytestmark = pytest.mark.skipif(mx.default_device().type != mx.cpu, reason="the fusion applies to the CPU only")


def test_the_cpu_compiles_fused_kernels_here():
    # CI and the README's machines have a C++ compiler; without one the server decodes unfused (logged).
    assert compiles_on_cpu()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rms_norm_is_bitwise_mlx_fast_rms_norm(dtype):
    x = (mx.random.normal((8, 1, 512), key=mx.random.key(1)) * 3).astype(dtype)
    weight = (1 + mx.random.normal((512,), key=mx.random.key(2)) / 10).astype(dtype)
    assert mx.array_equal(fused_rms_norm(x, weight, 1e-5), mx.fast.rms_norm(x, weight, 1e-5)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [64, 32])
def test_fused_rope_is_bitwise_mlx_fast_rope_at_any_offset(dtype, traditional, dims):
    q = mx.random.normal((8, 4, 1, 64), key=mx.random.key(3)).astype(dtype)
    rope = nn.RoPE(dims, traditional=traditional, base=10000.0)
    expected = {off: rope(q, offset=off) for off in (0, 123, 4095)}
    per_row = mx.array([5, 100, 77, 3000, 1, 0, 9, 12])
    expected["rows"] = rope(q, offset=per_row)
    rope.__class__ = FusedRoPE
    for off, want in expected.items():
        got = rope(q, offset=per_row if off == "rows" else off)
        assert mx.array_equal(got, want).item(), off
    assert mx.array_equal(fused_rope(q, per_row, dims, traditional, 10000.0, 1.0), expected["rows"]).item()


@pytest.fixture(scope="module")
def models():
    plain, tokenizer = load(str(BUNDLED))
    fused, _ = load(str(BUNDLED))
    for model in (plain, fused):
        model.set_dtype(mx.float32)
    return plain, fused, tokenizer


def test_fuse_for_cpu_swaps_every_rms_norm_and_rope_and_nothing_else(models):
    _, fused, _ = models
    kinds = [type(m) for _, m in fused.named_modules()]
    expected = sum(k in (nn.RMSNorm, nn.RoPE) for k in kinds)
    assert expected > 0
    assert fuse_for_cpu(fused) == expected
    after = [type(m) for _, m in fused.named_modules()]
    assert nn.RMSNorm not in after and nn.RoPE not in after
    assert after.count(FusedRMSNorm) == kinds.count(nn.RMSNorm) and after.count(FusedRoPE) == kinds.count(nn.RoPE)
    assert fuse_for_cpu(fused) == 0  # already fused: nothing left to swap


def test_a_fused_model_decodes_mlx_lms_tokens_and_logits(models):
    plain, fused, tokenizer = models
    fuse_for_cpu(fused)
    prompts = [tokenizer.encode(p) for p in ("12+30=", "The dog ran", "7+7=", "A quick brown fox jumps")]

    def decode(model, cls) -> list[list]:
        gen = cls(model, max_tokens=12, completion_batch_size=4, prefill_batch_size=4)
        uids = gen.insert(prompts, max_tokens=[12] * 4)
        out, done = {uid: [] for uid in uids}, 0
        while done < len(uids):
            for r in gen.next_generated():
                out[r.uid].append((r.token, r.logprobs))
                done += r.finish_reason is not None
        return [out[uid] for uid in uids]

    theirs, ours = decode(plain, BatchGenerator), decode(fused, LeanBatchGenerator)
    assert [[t for t, _ in row] for row in ours] == [[t for t, _ in row] for row in theirs]
    assert all(len(row) == 12 for row in ours)
    # mlx-lm's own generator on the fused model: every step's log-probabilities bitwise the plain model's
    again = decode(fused, BatchGenerator)
    for a, b in zip(again, theirs, strict=True):
        assert all(mx.array_equal(x, y).item() for (_, x), (_, y) in zip(a, b, strict=True))


def graph_ops(tmp_path, model) -> list[str]:
    """The operations of one decode step's graph (a one-token forward after a short prompt)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    path = tmp_path / "step.dot"
    mx.export_to_dot(str(path), model(mx.array([[4]]), cache=cache))
    return re.findall(r'label ="([A-Za-z]+)', path.read_text())


def test_the_decode_step_runs_fused_kernels_with_far_fewer_operations(models, tmp_path):
    plain, fused, _ = models
    fuse_for_cpu(fused)
    before, after = graph_ops(tmp_path, plain), graph_ops(tmp_path, fused)
    assert "Rsqrt" in before and "Cos" in before  # MLX's plain-op RMSNorm and RoPE
    assert "Rsqrt" not in after and any(op.startswith("Compiled") and "Rsqrt" in op for op in after)
    assert len(after) < 0.75 * len(before)
