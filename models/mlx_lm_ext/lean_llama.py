"""On the CPU, mlx-lm's llama and qwen2 decode steps (one token a row) built from half as many MLX graph nodes.

Each node of a step costs MLX's CPU stream microseconds beyond its arithmetic: the host thread
allocates and dispatches it, and every 10 dispatches the two threads hand work to each other (waking a
sleeping one is a system call). In llama-25m's float32 step at one row (641 nodes) one more node of
trivial arithmetic costs about 8 us (BENCHMARKS.md, "Fewer graph nodes a decode step").

The step computes what mlx-lm's llama computes, in the same order, with fewer nodes: activations stay
(rows, hidden), so no Linear flattens and unflattens its input; a plain Linear multiplies by a transpose
of its weight made once (a view); heads are one reshape; RoPE's cosines and sines are computed once a
step for all layers (by MLX's RoPE itself, so they are its values) and applied by one fused kernel per
projection; from LONG_ATTENTION positions, attention's softmax runs in fused kernels. Prompts (more than one
token a row), calls without a cache, sliding-window models, pipelined ones and other RoPE kinds run mlx-lm's code.
The modules' parameters are untouched; only the model's class changes. qwen2 is llama with biases on the query,
key and value projections (and its heads' size implied).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from models.decode.cpu_fusion import FusedRMSNorm, FusedRoPE, compiles_on_cpu, fused_rms_norm
from models.decode.module_swap import swap_classes

_PLAIN_ROPES = (nn.RoPE, FusedRoPE)
_PLAIN_MLPS = (llama.MLP, qwen2.MLP)


def _rotate(x: mx.array, swapped: mx.array, cos: mx.array, signed_sin: mx.array) -> mx.array:
    return x * cos + swapped * signed_sin


_fused_rotate = mx.compile(_rotate)


def _tables(unit: mx.array, offset: mx.array, sign: mx.array, dims: int, traditional: bool, base: float | None,
            scale: float) -> tuple[mx.array, mx.array]:
    # MLX's RoPE of (1, 0) pairs is (cos, sin): its own values, whatever its formula
    table = mx.fast.rope(mx.broadcast_to(unit, (offset.size, 1, 1, dims)), dims, traditional=traditional, base=base,
                         scale=scale, offset=offset)
    half = dims // 2
    table = table.reshape((offset.size, 1, half, 2) if traditional else (offset.size, 1, 2, half))
    cos, sin = (table[..., :1], table[..., 1:]) if traditional else (table[..., :1, :], table[..., 1:, :])
    return cos, sin * sign


_fused_tables = mx.compile(_tables)
_units: dict[tuple, tuple[mx.array, mx.array]] = {}


class RopeTables:
    """One step's RoPE as a multiply-add: for a head viewed as (.., 2, dims/2) (pairs across halves) or
    (.., dims/2, 2) (traditional: adjacent pairs), out = x * cos + swap(x) * (-sin, sin), which is
    mx.fast.rope's (x1 cos - x2 sin, x1 sin + x2 cos). Computed once for all layers of a step."""

    def __init__(self, rope: nn.RoPE, offset: int | mx.array, dtype: mx.Dtype) -> None:
        self.dims, self.traditional = rope.dims, rope.traditional
        key = (rope.dims, rope.traditional, dtype)
        if key not in _units:
            half = rope.dims // 2
            pair = mx.array([1.0, 0.0], dtype=dtype)
            signs = mx.array([-1.0, 1.0], dtype=dtype)
            if rope.traditional:
                _units[key] = mx.tile(pair, half).reshape(1, 1, 1, rope.dims), signs
            else:
                _units[key] = mx.repeat(pair, half).reshape(1, 1, 1, rope.dims), signs[:, None]
        unit, sign = _units[key]
        offset = offset if isinstance(offset, mx.array) else mx.array(offset, mx.int32)
        self.cos, self.signed_sin = _fused_tables(unit, offset.reshape(-1), sign, rope.dims, rope.traditional,
                                                  rope.base, rope.scale)

    def apply(self, x: mx.array, heads: int) -> mx.array:
        """`x`: (rows, heads * dims) projections -> (rows, heads, 1, dims) rotated heads."""
        rows, half = x.shape[0], self.dims // 2
        x = x.reshape((rows, heads, half, 2) if self.traditional else (rows, heads, 2, half))
        swapped = x[..., ::-1] if self.traditional else x[..., ::-1, :]
        return _fused_rotate(x, swapped, self.cos, self.signed_sin).reshape(rows, heads, 1, self.dims)


# From this many positions a float32 one-token step normalizes attention's scores in fused kernels: MLX's CPU
# softmax spends ~15 ns an element in its scalar exp, a third of attention's time at 2,048 positions.
LONG_ATTENTION = 1024


def _shifted_exp(scores: mx.array, top: mx.array) -> mx.array:
    return mx.exp(scores - top)


def _divided(weights: mx.array, total: mx.array) -> mx.array:
    return weights / total


_fused_shifted_exp, _fused_divided = mx.compile(_shifted_exp), mx.compile(_divided)


def _attention(q: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float, mask: Any) -> mx.array:
    """mlx-lm's attention; over LONG_ATTENTION positions or more in float32, the computation of MLX's CPU
    fallback for scaled_dot_product_attention (its order of operations, its masking) with the softmax's exp and
    division fused: the same sums, rounded alike within a unit or two in the last place."""
    if hasattr(cache, "bits") or keys.shape[-2] < LONG_ATTENTION or isinstance(mask, str) \
            or not q.dtype == keys.dtype == values.dtype == mx.float32:  # a quantized cache's keys are a tuple
        return scaled_dot_product_attention(q, keys, values, cache=cache, scale=scale, mask=mask)
    rows, heads, length, width = q.shape
    kv_heads = keys.shape[1]
    repeats = heads // kv_heads
    q = q * mx.array(scale, q.dtype)
    if repeats > 1:  # each key head serves `repeats` query heads
        q = q.reshape(rows, kv_heads, repeats, length, width)
        keys, values = mx.expand_dims(keys, 2), mx.expand_dims(values, 2)
    scores = q @ keys.swapaxes(-1, -2)
    if mask is not None:
        if repeats > 1 and mask.ndim >= 3:
            mask = mx.expand_dims(mask, -3) if mask.shape[-3] == 1 else \
                mask.reshape(*mask.shape[:-3], kv_heads, repeats, *mask.shape[-2:])
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype)) \
            if mask.dtype == mx.bool_ else scores + mask.astype(scores.dtype)
    weights = _fused_shifted_exp(scores, mx.max(scores, axis=-1, keepdims=True))
    out = _fused_divided(weights, mx.sum(weights, axis=-1, keepdims=True)) @ values
    return out.reshape(rows, heads, length, width) if repeats > 1 else out


class _Transposed:
    """A weight's transpose, kept off the module's parameters: a view of the same memory."""

    def __init__(self, weight: mx.array) -> None:
        self.weight, self.value = weight, weight.T


def _transposed(module: nn.Module) -> mx.array:
    weight = module["weight"]
    held = module.__dict__.get("_lean_transposed")
    if held is None or held.weight is not weight:  # the weight was replaced (an update, a load)
        held = _Transposed(weight)
        object.__setattr__(module, "_lean_transposed", held)
    return held.value


def _linear(module: nn.Module, x: mx.array) -> mx.array:
    """`module(x)`; a plain Linear without a node for its weight's transpose (evaluated with the first step)."""
    if type(module) is not nn.Linear:
        return module(x)
    if "bias" in module:
        return mx.addmm(module["bias"], x, _transposed(module))  # nn.Linear's own op
    return x @ _transposed(module)


def _norm(module: nn.Module, x: mx.array) -> mx.array:
    if isinstance(module, FusedRMSNorm):
        return fused_rms_norm(x, module["weight"], module.eps)
    return module(x)


def _mlp(mlp: Any, x: mx.array) -> mx.array:
    if type(mlp) not in _PLAIN_MLPS:
        return mlp(x)
    return _linear(mlp.down_proj, swiglu(_linear(mlp.gate_proj, x), _linear(mlp.up_proj, x)))


def _layer(layer: Any, h: mx.array, mask: Any, cache: Any, tables: RopeTables | None) -> mx.array:
    attn = layer.self_attn
    rows = h.shape[0]
    x = _norm(layer.input_layernorm, h)
    q, k, v = _linear(attn.q_proj, x), _linear(attn.k_proj, x), _linear(attn.v_proj, x)
    v = v.reshape(rows, attn.n_kv_heads, 1, -1)
    if tables is not None:
        q, k = tables.apply(q, attn.n_heads), tables.apply(k, attn.n_kv_heads)
    else:
        q = attn.rope(q.reshape(rows, attn.n_heads, 1, -1), offset=cache.offset)
        k = attn.rope(k.reshape(rows, attn.n_kv_heads, 1, -1), offset=cache.offset)
    keys, values = cache.update_and_fetch(k, v)
    out = _attention(q, keys, values, cache, attn.scale, mask)
    h = h + _linear(attn.o_proj, out.reshape(rows, -1))
    return h + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, h))


def _lean_step(model: Any, inputs: mx.array, cache: list[Any], mask_cache: Any) -> mx.array:
    """The one-token step of a llama-like `model` (mlx-lm's Model: .model.layers, .embed_tokens, .norm)."""
    inner = model.model
    rows = inputs.shape[0]
    h = inner.embed_tokens(inputs.reshape(rows))
    mask = create_attention_mask(inputs, mask_cache)
    rope = inner.layers[0].self_attn.rope
    tables = RopeTables(rope, cache[0].offset, h.dtype) if type(rope) in _PLAIN_ROPES and all(
        type(layer.self_attn.rope) is type(rope) and layer.self_attn.rope.dims == _head_dim(model, layer.self_attn)
        for layer in inner.layers) else None
    for layer, layer_cache in zip(inner.layers, cache, strict=True):
        h = _layer(layer, h, mask, layer_cache, tables)
    h = _norm(inner.norm, h)
    embed = inner.embed_tokens
    if not model.args.tie_word_embeddings:
        out = _linear(model.lm_head, h)
    elif type(embed) is nn.Embedding:
        out = h @ _transposed(embed)
    else:
        out = embed.as_linear(h)
    return out.reshape(rows, 1, -1)


def _head_dim(model: Any, attn: Any) -> int:
    # llama's attention says it; qwen2's heads split the hidden size (the model's heads: a shard holds fewer)
    return getattr(attn, "head_dim", None) or model.args.hidden_size // model.args.num_attention_heads


def _one_token_with_cache(inputs: mx.array, cache: Any, input_embeddings: mx.array | None) -> bool:
    return cache is not None and input_embeddings is None and inputs.ndim == 2 and inputs.shape[1] == 1


class LeanLlama(llama.Model):
    """mlx-lm's llama Model whose one-token steps with a KV cache run in fewer graph nodes."""

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: mx.array | None = None) -> mx.array:
        inner = self.model
        if not _one_token_with_cache(inputs, cache, input_embeddings) or inner.swa_idx is not None:
            return super().__call__(inputs, cache, input_embeddings)
        return _lean_step(self, inputs, cache, cache[inner.fa_idx])


class LeanQwen2(qwen2.Model):
    """mlx-lm's qwen2 Model whose one-token steps with a KV cache run in fewer graph nodes."""

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: mx.array | None = None) -> mx.array:
        if not _one_token_with_cache(inputs, cache, input_embeddings) or self.model.pipeline_size > 1:
            return super().__call__(inputs, cache, input_embeddings)
        return _lean_step(self, inputs, cache, cache[0])


LEAN_CLASSES = {llama.Model: LeanLlama, qwen2.Model: LeanQwen2}
# the attributes the lean step reads, past those every layer has (_LAYER_PARTS, _ATTENTION_PARTS)
_INNER_PARTS = {llama.Model: ("fa_idx", "swa_idx"), qwen2.Model: ("pipeline_size",)}
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale")


def _has_structure(model: Any) -> bool:
    """The instance attributes the lean step reads (mlx-lm 0.32's llama or qwen2), on every layer."""
    inner = getattr(model, "model", None)
    needed = ("layers", "embed_tokens", "norm", *_INNER_PARTS[type(model)])
    if not all(hasattr(inner, name) for name in needed) or not hasattr(model, "args"):
        return False
    return all(all(hasattr(layer, part) for part in _LAYER_PARTS)
               and all(hasattr(layer.self_attn, part) for part in _ATTENTION_PARTS) for layer in inner.layers)


def lean_decode_on_cpu(model: Any) -> bool:
    """Give a llama or qwen2 model (mlx-lm's llama.Model or qwen2.Model, exactly) the lean decode step when MLX
    runs on the CPU and compiles fused kernels there; returns whether it did."""
    lean = LEAN_CLASSES.get(type(model))
    if mx.default_device().type != mx.cpu or lean is None or not compiles_on_cpu() or not _has_structure(model):
        return False
    return swap_classes(model, {type(model): lean}) == 1
