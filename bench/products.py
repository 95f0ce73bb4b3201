"""A decode step's float32 products against the BLAS read rate they could reach, and what each BLAS thread adds:

    python -m bench.products --shape llama-25m --vocab 32000 --rows 1 8 --threads 1 2 --contexts 128 1024 4096 \
        --step-contexts 90 2048 4000

For each thread count (a process of its own: OpenBLAS reads its count when loaded), the weight shapes of the
model's step (attention, MLP, output layer), each times `rows` rows of activations: through MLX with the
forwarding library (models/platform/blas_forward.py) and through numpy's own OpenBLAS (sgemv at one row, sgemm
above), side by side, on enough distinct weights (~250 MB a shape) that they are read from memory, not cache.
The figure is the weight bytes read per second. Then one-token attention over `contexts` positions (the keys'
and values' bytes read per second), and the model's whole one-row decode step (a lone stream, greedy) after
prompts of `step-contexts` tokens at that thread count; from models.mlx_lm_ext.lean_llama.LONG_ATTENTION positions
also with MLX's own softmax in attention (the lean step's baseline), the two taking turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import SHAPES, ensure_model, write_result

WEIGHT_BYTES = 2.5e8  # distinct weights per shape: beyond what the caches keep between two reads


def _median_s(fn, repeats: int = 7, inner: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _shapes(shape: str, vocab: int) -> dict[str, tuple[int, int]]:
    hidden, inter = SHAPES[shape]["hidden"], SHAPES[shape]["intermediate"]
    return {"attention": (hidden, hidden), "mlp_in": (inter, hidden), "mlp_out": (hidden, inter),
            "output": (vocab, hidden)}


def _rates(name: str, n: int, k: int, rows: list[int]) -> list[dict]:
    """Weight bytes read per second by `rows`-row products with (n, k) weights: MLX (ours) and numpy's OpenBLAS."""
    import mlx.core as mx
    import numpy as np

    count = max(2, int(WEIGHT_BYTES // (n * k * 4)))
    weights = [mx.random.normal((n, k)) * 0.02 for _ in range(count)]
    mx.eval(weights)
    host = [np.array(w) for w in weights]
    found = []
    for m in rows:
        x = mx.random.normal((m, k))
        mx.eval(x)
        xh = np.array(x)[0] if m == 1 else np.array(x)  # one row: numpy's sgemv
        ours = _median_s(lambda: mx.eval([x @ w.T for w in weights])) / count  # noqa: B023
        theirs = _median_s(lambda: [xh @ w.T for w in host]) / count  # noqa: B023
        found.append({"weight": name, "shape": [n, k], "rows": m, "ours_gb_s": round(n * k * 4 / ours / 1e9, 2),
                      "numpy_openblas_gb_s": round(n * k * 4 / theirs / 1e9, 2), "ratio": round(theirs / ours, 3)})
        print(json.dumps(found[-1]), file=sys.stderr, flush=True)
    return found


def _attention(contexts: list[int], heads: int = 8, width: int = 64) -> list[dict]:
    """One-token attention (mx.fast.scaled_dot_product_attention, float32) over `contexts` positions: time per
    layer, as the extra time of 32 more in one evaluation, and the keys' and values' bytes read per second."""
    import mlx.core as mx

    keys, values = (mx.random.normal((1, heads, max(contexts), width)) for _ in range(2))
    query = mx.random.normal((1, heads, 1, width))
    mx.eval(keys, values, query)
    found = []
    for context in contexts:
        k, v = keys[..., :context, :], values[..., :context, :]

        def chain(layers: int, k=k, v=v) -> None:
            q = query
            for _ in range(layers):
                q = mx.fast.scaled_dot_product_attention(q, k, v, scale=width ** -0.5)
            mx.eval(q)

        per = (_median_s(lambda: chain(40)) - _median_s(lambda: chain(8))) / 32  # noqa: B023
        found.append({"context": context, "heads": heads, "width": width, "us_per_layer": round(per * 1e6, 1),
                      "kv_gb_s": round(2 * heads * context * width * 4 / per / 1e9, 2)})
        print(json.dumps(found[-1]), file=sys.stderr, flush=True)
    return found


def _step_ms(model, prompt: list[int], trials: int) -> list[float]:
    """Mean one-row step times (ms) of `trials` lone streams of 40 tokens after `prompt`."""
    from models.decode.single_stream import SingleStream

    means = []
    for _ in range(trials):
        stream = SingleStream(model, prompt, 40, None, [], set(), 0)
        times = []
        for _ in range(39):
            start = time.perf_counter()
            stream.step()
            times.append(time.perf_counter() - start)
        means.append(statistics.mean(times[3:]) * 1e3)
    return means


def _steps(model, vocab: int, contexts: list[int]) -> list[dict]:
    """The model's one-row step after prompts of `contexts` tokens; from LONG_ATTENTION positions also with MLX's
    own softmax (the baseline), the two taking turns."""
    from models.mlx_lm_ext import lean_llama

    fused_from, found = lean_llama.LONG_ATTENTION, []
    for context in contexts:
        prompt = [(7 * i) % (vocab - 5) + 5 for i in range(context)]
        kinds = {"ours": fused_from, "mlx_softmax": 1 << 30} if context >= fused_from else {"ours": fused_from}
        runs: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(4):
            for kind, threshold in kinds.items():
                lean_llama.LONG_ATTENTION = threshold
                runs[kind] += _step_ms(model, prompt, 1)
        lean_llama.LONG_ATTENTION = fused_from
        entry = {"context": context, **{f"{kind}_ms": round(statistics.median(v), 3) for kind, v in runs.items()}}
        if "mlx_softmax" in runs:
            entry["speedup"] = round(statistics.median(runs["mlx_softmax"]) / statistics.median(runs["ours"]), 3)
        found.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    return found


def measure(shape: str, vocab: int, rows: list[int], contexts: list[int], step_contexts: list[int]) -> dict:
    """This process's figures (its BLAS thread count came from the environment)."""
    from models.platform.blas import configure_blas

    info = configure_blas("auto")
    import gc

    import mlx.core as mx

    from models.weights.loader import load_variant

    products = [rate for name, (n, k) in _shapes(shape, vocab).items() for rate in _rates(name, n, k, rows)]
    attention = _attention(contexts)
    gc.collect()
    mx.clear_cache()  # the products' weights leave no buffers behind for the step
    model = load_variant("m", ensure_model(shape, "float32", vocab), "float32").model
    return {"blas_threads": info.threads, "products": products, "attention": attention,
            "steps": _steps(model, vocab, step_contexts)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-25m", choices=sorted(SHAPES))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096],
                   help="positions of the one-token attention measured (8 heads of 64)")
    p.add_argument("--step-contexts", type=int, nargs="+", default=[90, 2048, 4000],
                   help="prompt lengths before the one-row steps measured")
    p.add_argument("--name", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.shape, args.vocab, args.rows, args.contexts, args.step_contexts)))
        return
    ensure_model(args.shape, "float32", args.vocab)
    runs = []
    for threads in args.threads:
        cmd = [sys.executable, "-m", "bench.products", "--child", "--shape", args.shape, "--vocab", str(args.vocab),
               "--rows", *map(str, args.rows), "--contexts", *map(str, args.contexts),
               "--step-contexts", *map(str, args.step_contexts)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}).stdout
        runs.append({"threads_asked": threads, **json.loads(out.strip().splitlines()[-1])})
        print(json.dumps(runs[-1], indent=1), flush=True)
    name = args.name or f"products-{args.shape}-v{args.vocab}"
    print("wrote", write_result(name, {"shape": args.shape, "vocab": args.vocab, "runs": runs}))


if __name__ == "__main__":
    main()
