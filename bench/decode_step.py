"""One decode step of a batch: mlx-lm's BatchGenerator vs dtype-serve's LeanBatchGenerator
(models/mlx_lm_ext/batch_generator.py: greedy float32 rows skip the log-sum-exp), in one process, taking turns:

    python -m bench.decode_step --shape llama-25m --dtype float32 --vocab 32000 --batch 1 8 16 --trials 5

Each trial inserts `batch` distinct prompts into a fresh generator of each kind and decodes them to
the end; the figure is the median step time after the first (prefill) step, and the ratio is
mlx-lm's over ours per trial (median over trials). The tokens of both must match.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.baselines import load
from bench.common import PROMPT, ensure_model, gpu_model_parser, write_result


def decode(cls, model, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
    gen = cls(model, max_tokens=tokens, completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    uids = gen.insert(prompts, max_tokens=[tokens] * len(prompts))
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    steps, finished, start = [], 0, time.perf_counter()
    while finished < len(uids):
        for r in gen.next_generated():
            out[r.uid].append(r.token)
            finished += r.finish_reason is not None
        now = time.perf_counter()
        steps.append(now - start)
        start = now
    return [out[uid] for uid in uids], statistics.median(steps[1:])


def step_arguments(doc: str, name: str, trials: int, argv: list[str] | None) -> argparse.Namespace:
    """The options of a decode-step benchmark (this one and bench.cpu_decode)."""
    p = gpu_model_parser(doc, name)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=trials)
    return p.parse_args(argv)


def write_steps(a: argparse.Namespace, rows: dict) -> dict:
    """The result file of a decode-step benchmark: its options and the figures by batch size."""
    out = {"shape": a.shape, "dtype": a.dtype, "vocab": a.vocab, "tokens": a.tokens, "trials": a.trials,
           "by_batch": rows}
    print(f"wrote {write_result(a.name, out)}")
    return out


def main(argv: list[str] | None = None) -> dict:
    a = step_arguments(__doc__, "decode-step", 5, argv)
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    model, tokenizer = load(str(folder), a.dtype)
    from mlx_lm.generate import BatchGenerator

    from models.mlx_lm_ext.batch_generator import LeanBatchGenerator

    rows = {}
    for batch in a.batch:
        prompts = [tokenizer.encode(f"{i:02d} {PROMPT}") for i in range(batch)]
        decode(LeanBatchGenerator, model, prompts, 4)  # warm both paths' shapes
        decode(BatchGenerator, model, prompts, 4)
        base, lean, ratios = [], [], []
        for _ in range(a.trials):
            ref_tokens, ref_step = decode(BatchGenerator, model, prompts, a.tokens)
            our_tokens, our_step = decode(LeanBatchGenerator, model, prompts, a.tokens)
            if our_tokens != ref_tokens:
                raise SystemExit(f"batch {batch}: the lean step gave other tokens than mlx-lm's")
            base.append(ref_step * 1e3)
            lean.append(our_step * 1e3)
            ratios.append(ref_step / our_step)
        rows[batch] = {"mlx_lm_step_ms": round(statistics.median(base), 2),
                       "lean_step_ms": round(statistics.median(lean), 2),
                       "speedup": round(statistics.median(ratios), 3),
                       "trials_speedup": [round(r, 3) for r in ratios]}
        print(f"batch {batch}: {rows[batch]}")
    return write_steps(a, rows)


if __name__ == "__main__":
    main()
