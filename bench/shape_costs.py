"""What a prompt length never seen before costs on this device, whole model and op by op:

    python -m bench.shape_costs --shape llama-1b --dtype bfloat16

For each new length: the first forward pass (fresh KV cache) vs the same length again; then the
single ops of a llama layer at a new sequence length vs a repeated one. MLX's CUDA backend sets
up some kernels per shape; this says which, and how long a first request waits for them.
"""

from __future__ import annotations

import json
import statistics
import time

from bench.baselines import load
from bench.common import ensure_model, gpu_model_parser, write_result


def timed(fn) -> float:
    import mlx.core as mx

    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = gpu_model_parser(__doc__, "shape-costs")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    model, _ = load(str(folder), a.dtype)
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    def forward(length: int, offset: int = 0) -> float:
        cache = make_prompt_cache(model)
        if offset:
            mx.eval(model(mx.zeros((1, offset), mx.int32), cache=cache))
        return timed(lambda: model(mx.ones((1, length), mx.int32), cache=cache))

    forward(64)
    forward(64)
    model_rows = []
    for length in (37, 53, 71, 95, 113, 160, 256):
        first = forward(length)
        again = statistics.median(forward(length) for _ in range(3))
        model_rows.append({"length": length, "first_s": round(first, 5), "again_s": round(again, 5)})
    # the same new lengths after a cached prefix of 64 tokens (a prefix-cache hit)
    for length in (41, 59):
        first = forward(length, offset=64)
        again = statistics.median(forward(length, offset=64) for _ in range(3))
        model_rows.append({"length": length, "offset": 64, "first_s": round(first, 5), "again_s": round(again, 5)})

    hidden = model.args.hidden_size
    dtype = getattr(mx, a.dtype)
    layer = model.model.layers[0]
    heads, kv_heads = model.args.num_attention_heads, model.args.num_key_value_heads
    head_dim = hidden // heads

    def ops(length: int) -> dict:
        x = mx.random.normal((1, length, hidden)).astype(dtype)
        q = mx.random.normal((1, heads, length, head_dim)).astype(dtype)
        k = mx.random.normal((1, kv_heads, length, head_dim)).astype(dtype)
        mx.eval(x, q, k)
        return {
            "linear_qkv": timed(lambda: layer.self_attn.q_proj(x)),
            "linear_mlp": timed(lambda: layer.mlp.gate_proj(x)),
            "rms_norm": timed(lambda: layer.input_layernorm(x)),
            "rope": timed(lambda: layer.self_attn.rope(q)),
            "sdpa_causal": timed(lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1, mask="causal")),
            "silu_mul": timed(lambda: layer.mlp.act(x) * x) if hasattr(layer.mlp, "act") else
            timed(lambda: x * mx.sigmoid(x) * x),
            "lm_head_last": timed(lambda: model.model.embed_tokens.as_linear(x[:, -1:])
                                  if model.args.tie_word_embeddings else model.lm_head(x[:, -1:])),
        }

    ops(64)
    op_rows = []
    for length in (45, 77, 99):
        first, again = ops(length), ops(length)
        op_rows.append({"length": length, **{name: {"first_ms": round(first[name] * 1e3, 3),
                                                    "again_ms": round(again[name] * 1e3, 3)} for name in first}})
    out = {"shape": a.shape, "dtype": a.dtype, "model": model_rows, "ops": op_rows}
    print(json.dumps(out, indent=1))
    write_result(a.name, out)
    return out


if __name__ == "__main__":
    main()
