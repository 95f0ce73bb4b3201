"""Baseline: mlx-lm's BatchGenerator driven directly, `batch` sequences of `tokens` tokens each.

    python -m bench.batchgen FOLDER DTYPE BATCH TOKENS [--blas auto|none]
Prints {"tok_s": aggregate tokens per second, "tokens": n} of the run after one warm-up run.
"""

from __future__ import annotations

import json
import sys

from bench.baselines import batchgen_run, load
from bench.common import PROMPT
from models.blas import blas_choice


def main() -> None:
    folder, dtype, batch, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model, tokenizer = load(folder, dtype, blas_choice(sys.argv[5:]))
    batchgen_run(model, tokenizer, PROMPT, batch, tokens)  # warm-up: kernels, caches
    print(json.dumps(batchgen_run(model, tokenizer, PROMPT, batch, tokens)))


if __name__ == "__main__":
    main()
