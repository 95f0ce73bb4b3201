"""The direct-MLX baselines: mlx_lm.stream_generate and mlx-lm's BatchGenerator, timed like a client
times a request; and a process that keeps the model loaded and runs them on demand, so that a
benchmark can alternate baseline and server trials (drift of a shared machine hits both alike).

    python -m bench.baselines FOLDER DTYPE [--blas auto|none]
DTYPE is a float dtype or a quantized precision (q8, q4:float32), quantized as mlx_lm.convert would.
reads one JSON command per line ({"kind": "direct", "prompt": P, "tokens": N} or
{"kind": "batchgen", "prompt": P, "batch": B, "tokens": N}) and answers one JSON line each.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT


def load(folder: str, dtype: str, blas: str = "auto") -> tuple[Any, Any]:
    """Model and tokenizer after the server's own MLX start-up (BLAS, attention kernels)."""
    from models.platform.compat import prepare_mlx

    prepare_mlx(blas)
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    from models.weights.dtypes import parse_precision

    model, tokenizer = mlx_lm_load(folder)
    precision = parse_precision(dtype)
    if precision.quantization is None:
        if dtype != "auto":
            model.set_dtype(getattr(mx, dtype))
    else:  # as `mlx_lm.convert --dtype <rest> -q` makes it: cast, then mlx-lm's quantize_model
        from mlx_lm.utils import quantize_model

        q = precision.quantization
        model.set_dtype(getattr(mx, precision.float_dtype or "bfloat16"))
        with contextlib.redirect_stdout(sys.stderr):  # it prints; stdout carries the answers
            model, _ = quantize_model(model, {}, q.group_size, q.bits, mode=q.mode)
    mx.eval(model.parameters())
    return model, tokenizer


def direct_run(model: Any, tokenizer: Any, prompt: str, tokens: int) -> dict:
    """One stream_generate call: end-to-end tokens/s and time to the first token."""
    from mlx_lm import stream_generate

    start, first, n = time.perf_counter(), None, 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        n = response.generation_tokens
        if first is None:
            first = time.perf_counter() - start
    return {"tok_s": n / (time.perf_counter() - start), "ttft_s": first, "tokens": n}


def batchgen_run(model: Any, tokenizer: Any, prompt: str, batch: int, tokens: int) -> dict:
    """`batch` copies of the prompt inserted at once into a BatchGenerator, run to the end."""
    from mlx_lm.generate import BatchGenerator

    ids = tokenizer.encode(prompt)
    gen = BatchGenerator(model, max_tokens=tokens, completion_batch_size=max(batch, 1),
                         prefill_batch_size=min(batch, 8))
    gen.insert([ids] * batch, max_tokens=[tokens] * batch)
    done, produced, start = 0, 0, time.perf_counter()
    while done < batch:
        for r in gen.next_generated():
            produced += 1
            done += r.finish_reason is not None
    return {"tok_s": produced / (time.perf_counter() - start), "tokens": produced, "batch": batch}


class BaselineProcess:
    """The baselines in their own process (as a server is), one command at a time."""

    def __init__(self, folder: str, dtype: str, blas: str = "auto") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.baselines", folder, dtype, "--blas", blas],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask({"kind": "ready"})

    def _ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline process exited ({self.proc.wait()})")
        return json.loads(line)

    def direct(self, prompt: str, tokens: int) -> dict:
        return self._ask({"kind": "direct", "prompt": prompt, "tokens": tokens})

    def batchgen(self, prompt: str, batch: int, tokens: int) -> dict:
        return self._ask({"kind": "batchgen", "prompt": prompt, "batch": batch, "tokens": tokens})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def __enter__(self) -> BaselineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    folder, dtype = sys.argv[1], sys.argv[2]
    from models.platform.blas import blas_choice

    model, tokenizer = load(folder, dtype, blas_choice(sys.argv[3:]))
    for line in sys.stdin:
        command = json.loads(line)
        if command["kind"] == "direct":
            out = direct_run(model, tokenizer, command["prompt"], command["tokens"])
        elif command["kind"] == "batchgen":
            out = batchgen_run(model, tokenizer, command["prompt"], command["batch"], command["tokens"])
        else:
            out = {"ready": True}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
