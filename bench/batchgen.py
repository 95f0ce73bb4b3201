"""Baseline: mlx-lm's BatchGenerator driven directly, `batch` sequences of `tokens` tokens each.

    python -m bench.batchgen FOLDER DTYPE BATCH TOKENS [--blas auto|none]
Prints {"tok_s": aggregate tokens per second, "tokens": n}.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    folder, dtype, batch, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from models.blas import blas_choice
    from models.compat import prepare_mlx

    prepare_mlx(blas_choice(sys.argv[5:]))  # the same start-up as the server (BLAS, attention kernels)
    import time

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(folder)
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2)

    def run() -> tuple[int, float]:
        gen = BatchGenerator(model, max_tokens=tokens, completion_batch_size=max(batch, 1),
                             prefill_batch_size=min(batch, 8))
        gen.insert([prompt] * batch, max_tokens=[tokens] * batch)
        done, produced, start = 0, 0, time.perf_counter()
        while done < batch:
            for r in gen.next_generated():
                produced += 1
                done += r.finish_reason is not None
        return produced, time.perf_counter() - start

    run()  # warm-up: kernels, caches
    produced, seconds = run()
    print(json.dumps({"tok_s": produced / seconds, "tokens": produced, "batch": batch}))


if __name__ == "__main__":
    main()
