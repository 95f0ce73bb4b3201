"""Baseline: mlx_lm.stream_generate called directly, timed like an HTTP client times a request.

Run as its own process: python -m bench.direct FOLDER DTYPE PROMPT MAX_TOKENS RUNS [--blas auto|none]
Prints the medians over RUNS runs after one warm-up run.
"""

from __future__ import annotations

import json
import statistics
import sys

from bench.baselines import direct_run, load
from models.blas import blas_choice


def main() -> None:
    folder, dtype, prompt, max_tokens, runs = sys.argv[1:6]
    model, tokenizer = load(folder, dtype, blas_choice(sys.argv[6:]))
    direct_run(model, tokenizer, prompt, int(max_tokens))  # warm-up (kernels, caches), as the server's
    rows = [direct_run(model, tokenizer, prompt, int(max_tokens)) for _ in range(int(runs))]
    print(json.dumps({"tok_s": statistics.median(r["tok_s"] for r in rows),
                      "ttft_s": statistics.median(r["ttft_s"] for r in rows), "tokens": rows[-1]["tokens"]}))


if __name__ == "__main__":
    main()
