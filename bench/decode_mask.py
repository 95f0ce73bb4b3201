"""A decode step with and without the mask while no row is padded (models/mlx_lm_ext/decode_mask.py), next to
mlx-lm's BatchGenerator, in one process, taking turns:

    python -m bench.decode_mask --shape llama-1b --dtypes bfloat16 float16 float32 --batch 32 8 --trials 7

Every trial decodes `batch` prompts of one length (so no row is padded) to the end in each of:
mlx-lm's BatchGenerator (`mlx_lm`), dtype-serve's LeanBatchGenerator with the mask kept (`lean_masked`)
and as served (`lean_unmasked`). Figures: median step times after the prefill, the medians of the per-trial
ratios, and the share of token positions where the served path agrees with mlx-lm's (attention without
the mask runs another kernel on CUDA, so 16-bit rounding can differ; on the CPU it is bitwise the same).
"""

from __future__ import annotations

import statistics

from bench.baselines import load
from bench.common import PROMPT, ensure_model, gpu_model_parser, write_result
from bench.decode_step import decode


def main(argv: list[str] | None = None) -> dict:
    p = gpu_model_parser(__doc__, "decode-mask")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, nargs="+", default=[32, 8])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=7)
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    from models.platform.compat import prepare_mlx

    prepare_mlx()  # the BLAS before anything imports MLX (bench.baselines.load would be too late here)
    from mlx_lm.generate import BatchGenerator

    import models.mlx_lm_ext.batch_generator as decode_batch

    served = decode_batch.unmask_unpadded
    paths = {"mlx_lm": (BatchGenerator, served), "lean_masked": (decode_batch.LeanBatchGenerator, lambda caches: None),
             "lean_unmasked": (decode_batch.LeanBatchGenerator, served)}
    out: dict = {"shape": a.shape, "vocab": a.vocab, "tokens": a.tokens, "trials": a.trials, "dtypes": {}}
    try:
        for dtype in a.dtypes:
            model, tokenizer = load(str(folder), dtype)
            for batch in a.batch:
                prompts = [tokenizer.encode(f"{i:02d} {PROMPT}") for i in range(batch)]
                steps: dict[str, list[float]] = {name: [] for name in paths}
                tokens: dict[str, list] = {}
                for trial in range(a.trials + 1):  # trial 0 warms every path's shapes
                    for name, (cls, unmask) in paths.items():
                        decode_batch.unmask_unpadded = unmask
                        tokens[name], step = decode(cls, model, prompts, a.tokens if trial else 4)
                        if trial:
                            steps[name].append(step * 1e3)
                positions = sum(map(len, tokens["mlx_lm"]))
                agree = sum(x == y for ours, theirs in zip(tokens["lean_unmasked"], tokens["mlx_lm"], strict=True)
                            for x, y in zip(ours, theirs, strict=False))
                row = {f"{name}_step_ms": round(statistics.median(s), 2) for name, s in steps.items()}
                for base in ("mlx_lm", "lean_masked"):
                    row[f"{base}_over_unmasked"] = round(statistics.median(
                        [b / u for b, u in zip(steps[base], steps["lean_unmasked"], strict=True)]), 3)
                row["token_agreement_with_mlx_lm"] = round(agree / positions, 4)
                row["masked_tokens_equal_mlx_lm"] = tokens["lean_masked"] == tokens["mlx_lm"]
                out["dtypes"].setdefault(dtype, {})[batch] = row
                print(f"{dtype} batch {batch}: {row}", flush=True)
            del model
    finally:
        decode_batch.unmask_unpadded = served
    print(f"wrote {write_result(a.name, out)}")
    return out


if __name__ == "__main__":
    main()
