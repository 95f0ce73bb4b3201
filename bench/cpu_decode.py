"""One decode step on the CPU: mlx-lm's model as `mlx_lm.load` builds it vs dtype-serve's changes to it,
all in dtype-serve's LeanBatchGenerator, in one process, taking turns:

    python -m bench.cpu_decode --shape llama-25m --dtype float32 --vocab 32000 --batch 1 8 16 --trials 7

Configurations: `plain` (mlx-lm's load + set_dtype), `fused` (RMSNorm and RoPE compiled,
models/decode/cpu_fusion.py), `layout` (dtype-serve's load: column-major float32 Linear weights,
models/decode/cpu_layout.py, modules unfused) and `served` (both, as the server runs). The figure is the median
step time after the prefill; ratios are plain's over each per trial (median over trials). Every
configuration's tokens must match plain's.
"""

from __future__ import annotations

import statistics

from bench.baselines import load
from bench.common import PROMPT, ensure_model
from bench.decode_step import decode, step_arguments, write_steps


def set_fused(model, fused: bool) -> None:
    # not at the top: MLX is imported only after the BLAS is chosen (bench.baselines.load)
    from models.decode.cpu_fusion import FUSED_CLASSES

    swaps = FUSED_CLASSES if fused else {v: k for k, v in FUSED_CLASSES.items()}
    for _, module in model.named_modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]


def main(argv: list[str] | None = None) -> dict:
    a = step_arguments(__doc__, "cpu-decode", 7, argv)
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    plain_model, tokenizer = load(str(folder), a.dtype)  # mlx-lm's load: plain modules, row-major weights
    from models.decode.cpu_fusion import compiles_on_cpu
    from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
    from models.weights.loader import load_variant

    if not compiles_on_cpu():
        raise SystemExit("MLX cannot compile CPU kernels here")
    ours = load_variant(folder.name, folder, a.dtype).model
    configs = {"plain": (plain_model, False), "fused": (plain_model, True), "layout": (ours, False),
               "served": (ours, True)}
    rows = {}
    for batch in a.batch:
        prompts = [tokenizer.encode(f"{i:02d} {PROMPT}") for i in range(batch)]
        for model, fused in configs.values():  # warm every configuration's shapes
            set_fused(model, fused)
            decode(LeanBatchGenerator, model, prompts, 4)
        steps: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(a.trials):
            tokens = {}
            for name, (model, fused) in configs.items():
                set_fused(model, fused)
                tokens[name], step = decode(LeanBatchGenerator, model, prompts, a.tokens)
                steps[name].append(step * 1e3)
            if any(t != tokens["plain"] for t in tokens.values()):
                raise SystemExit(f"batch {batch}: a configuration gave other tokens than the plain model")
        rows[batch] = {f"{name}_step_ms": round(statistics.median(s), 2) for name, s in steps.items()}
        for name in list(configs)[1:]:
            ratios = [p / s for p, s in zip(steps["plain"], steps[name], strict=True)]
            rows[batch][f"{name}_speedup"] = round(statistics.median(ratios), 3)
            rows[batch][f"{name}_trials_speedup"] = [round(r, 3) for r in ratios]
        print(f"batch {batch}: " + ", ".join(f"{k} {v}" for k, v in rows[batch].items() if "trials" not in k))
    return write_steps(a, rows)


if __name__ == "__main__":
    main()
