"""The quantized KV cache: its bytes per token, the sequences a fixed budget holds, and the speed it costs.

    python -m bench.kv_cache --shape llama-25m --context 2048 --clients 8 --budget-mib 512
    python -m bench.kv_cache --shape llama-1b --dtype bfloat16 --context 2048 --clients 32 --budget-mib 8192 \
        --name kv-cache-h200      # on a GPU (the H200): nothing here is CPU-only

1. Bytes per token at 8 and 4 bits vs the bfloat16 cache: from real caches of `--context` tokens (mlx-lm's
   KVCache, QuantizedKVCache, and our QuantizedBatchKVCache), with the server's /memory/estimate beside them.
2. Sequences of `--context` tokens that `--budget-mib` of MLX active memory holds per KV precision:
   caches are filled one sequence at a time (random keys and values through update_and_fetch, all layers)
   until the next one would pass the budget.
3. Aggregate tokens/s at `--clients` clients, a ~`--context`-token prompt each: the float KV cache and the
   8-bit one of the same resident weights (`model:float32` and `model:float32+kv8`), side by side in one
   server, in alternating order.

Results: bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

import httpx

from bench.common import ensure_model, free_port, load_run, server, write_result

KV = {"float": None, "kv8": 8, "kv4": 4}


def measured_bytes_per_token(folder, context: int, float_dtype: str) -> dict:
    """Bytes per token of real caches of `context` tokens (a multiple of the caches' step: no spare room)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    from models.mlx_lm_ext.quantized_batch_cache import QuantizedBatchKVCache
    from models.weights.checkpoint import read_config
    from models.weights.estimate import kv_group_size, kv_shape

    model, _ = load(str(folder))
    config = read_config(folder)
    layers, heads, dim = kv_shape(config)
    group = kv_group_size(config)
    dtype = getattr(mx, float_dtype)
    out = {}
    for name, bits in KV.items():
        lone = [KVCache() if bits is None else QuantizedKVCache(group_size=group, bits=bits) for _ in range(layers)]
        batch = [QuantizedBatchKVCache([0, 0], group_size=group, bits=bits) for _ in range(layers)] if bits else None
        for i in range(layers):
            k = mx.random.normal((1, heads, context, dim)).astype(dtype)
            lone[i].update_and_fetch(k, k)
            if batch:
                kk = mx.concatenate([k, k])
                batch[i].update_and_fetch(kk, kk)
        mx.eval([c.state for c in lone] + ([c.state for c in batch] if batch else []))
        entry = {"bytes_per_token": sum(c.nbytes for c in lone) // context}
        if batch:
            entry["batch_bytes_per_token"] = sum(c.nbytes for c in batch) // (2 * context)
        out[name] = entry
    del model
    return out


def sequences_within(budget: int, folder, context: int, float_dtype: str, bits: int | None) -> int:
    """Sequences of `context` tokens whose KV caches fit `budget` bytes of MLX active memory."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    from models.weights.checkpoint import read_config
    from models.weights.estimate import kv_group_size, kv_shape

    config = read_config(folder)
    layers, heads, dim = kv_shape(config)
    group = kv_group_size(config)
    dtype = getattr(mx, float_dtype)
    mx.clear_cache()
    base = mx.get_active_memory()
    held, per_sequence = [], None
    while True:
        cache = [KVCache() if bits is None else QuantizedKVCache(group_size=group, bits=bits) for _ in range(layers)]
        for c in cache:  # keys and values apart: a write over a whole buffer may alias its source
            k, v = (mx.random.normal((1, heads, context, dim)).astype(dtype) for _ in range(2))
            c.update_and_fetch(k, v)
            mx.eval(c.state)
            del k, v
        mx.clear_cache()  # the float source of a quantized cache is freed: only the cache stays
        used = mx.get_active_memory() - base
        per_sequence = per_sequence or used
        if used > budget:
            break
        held.append(cache)
        if used + per_sequence > budget:
            break
    count = len(held)
    del held
    mx.clear_cache()
    return count


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-25m")
    p.add_argument("--dtype", default="float32", help="stored dtype of the generated model (the CPU's fastest)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--budget-mib", type=int, default=512)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--no-serving", action="store_true", help="bytes and sequences only")
    p.add_argument("--name", default="kv-cache")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, a.dtype, context=max(4096, a.context))

    measured = measured_bytes_per_token(folder, a.context, "bfloat16")
    float_cost = measured["float"]["bytes_per_token"]
    result: dict = {"shape": a.shape, "stored_dtype": a.dtype, "context": a.context,
                    "bytes_per_token_bfloat16": {k: {**v, "vs_float": round(v["bytes_per_token"] / float_cost, 4)}
                                                 for k, v in measured.items()}}
    budget = a.budget_mib * 2**20
    sequences = {name: sequences_within(budget, folder, a.context, "bfloat16", bits) for name, bits in KV.items()}
    result["sequences_in_budget"] = {"budget_bytes": budget, "kv_dtype_of_rest": "bfloat16", "counts": sequences,
                                     "vs_float": {k: round(v / sequences["float"], 3) for k, v in sequences.items()}}
    print(json.dumps(result, indent=2), flush=True)
    if not a.no_serving:
        result["serving"] = serve(folder, a)
    write_result(a.name, result)
    return result


def serve(folder, a: argparse.Namespace) -> dict:
    """Aggregate tokens/s of `model:float32` and `model:float32+kv8` at `a.clients`, in alternating order."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    variants = [a.dtype, f"{a.dtype}+kv8"]
    cmd = [sys.executable, "-m", "server", "--model", str(folder), "--dtype", a.dtype, "--port", str(port),
           "--max-batch-size", str(a.clients), "--max-queue", "256", "--max-tokens-limit", str(a.context),
           "--log-level", "warning"]
    prompt = ("The quick brown fox jumps over the lazy dog. " * (a.context // 45 + 1))[: a.context - a.max_tokens - 8]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    estimates = {}
    with server(cmd, f"{base}/health/ready"):
        for v in variants:
            httpx.post(f"{base}/models/load", json={"dtype": v}, timeout=600).raise_for_status()
            estimates[v] = httpx.get(f"{base}/memory/estimate", params={"dtype": v}, timeout=60).json()["estimates"][0]
        url = f"{base}/v1/completions"
        bodies = {v: {"model": f"{folder.name}:{v}", "prompt": prompt, "max_tokens": a.max_tokens,
                      "temperature": 0.0, "ignore_eos": True} for v in variants}
        for body in bodies.values():  # the prompt's cache for each variant, and its shapes
            asyncio.run(load_run(url, body, 1, 1, seed=-1))
        for trial in range(a.trials):
            for v in (variants if trial % 2 == 0 else variants[::-1]):
                runs[v].append(asyncio.run(load_run(url, bodies[v], a.clients, 1, seed=trial)))
        memory = {m["dtype"]: m for m in httpx.get(f"{base}/memory", timeout=60).json()["variants"]}
        used = httpx.get(f"{base}/memory", timeout=60).json()["budget"]
    out: dict = {"clients": a.clients, "prompt_chars": len(prompt), "max_tokens": a.max_tokens, "variants": {}}
    for v in variants:
        agg = statistics.median(r["aggregate_tok_s"] for r in runs[v])
        out["variants"][v] = {"aggregate_tok_s_median": agg, "runs": runs[v],
                              "kv_bytes_per_token": memory[v]["kv_cache"]["bytes_per_token"],
                              "estimate_kv_cache": estimates[v]["kv_cache"]}
    out["kv8_vs_float_aggregate"] = round(out["variants"][variants[1]]["aggregate_tok_s_median"]
                                          / out["variants"][variants[0]]["aggregate_tok_s_median"], 3)
    out["weights_bytes_resident"] = used["weights_bytes"]  # used_bytes also counts prompt and live KV caches
    out["weights_bytes_one_variant"] = memory[a.dtype]["total_bytes"]
    print(json.dumps(out, indent=2), flush=True)
    return out


if __name__ == "__main__":
    main()
