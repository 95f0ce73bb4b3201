"""Baseline: mlx_lm.stream_generate called directly, timed like an HTTP client times a request.

Run as its own process: python -m bench.direct FOLDER DTYPE PROMPT MAX_TOKENS RUNS [--blas auto|none]
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    folder, dtype, prompt, max_tokens, runs = sys.argv[1:6]
    blas = sys.argv[7] if len(sys.argv) > 7 and sys.argv[6] == "--blas" else "auto"
    from models.compat import prepare_mlx

    prepare_mlx(blas)  # the same start-up as the server (BLAS, attention kernels)
    import statistics
    import time

    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(folder)
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    rates, ttfts = [], []
    for i in range(int(runs) + 1):
        start = time.perf_counter()
        first, n = None, 0
        for response in stream_generate(model, tokenizer, prompt, max_tokens=int(max_tokens)):
            n = response.generation_tokens
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        if i:  # the first run warms up (kernels, caches), as the server's warm-up does
            rates.append(n / total)
            ttfts.append(first)
    print(json.dumps({"tok_s": statistics.median(rates), "ttft_s": statistics.median(ttfts), "tokens": n}))


if __name__ == "__main__":
    main()
