"""Peak memory of a load, cast while loading (ours) vs mlx_lm.load + model.set_dtype (naive).

    python -m bench.load_memory [--sizes 0.1 1]

For float32 -> bfloat16, bfloat16 -> float32 and bfloat16 -> float16, on generated checkpoints of
about 0.1 and 1 GB. Each load runs in a fresh process so that MLX's peak counter and cache start
clean. Reports peak / final for both and ours' bound 1 + largest tensor / final.
"""

from __future__ import annotations

import argparse
import json

from bench.common import ROOT, child_json, ensure_model, write_result

# (source dtype, size in GB) -> shape whose file is about that size
CHECKPOINTS = {("float32", "0.1"): "llama-25m", ("bfloat16", "0.1"): "llama-50m",
               ("float32", "1"): "llama-250m", ("bfloat16", "1"): "llama-500m"}
CONVERSIONS = [("float32", "bfloat16"), ("bfloat16", "float32"), ("bfloat16", "float16")]

_CHILD = """
import json, sys, gc
from models.platform.blas import configure_blas; configure_blas('auto')
import mlx.core as mx
folder, target, method = sys.argv[1:4]
gc.collect(); mx.clear_cache(); base = mx.get_active_memory(); mx.reset_peak_memory()
if method == 'ours':
    from pathlib import Path
    from models.weights.loader import load_variant
    v = load_variant('bench', Path(folder), target)
    out = {'peak': v.stats.peak_bytes, 'final': v.stats.final_bytes, 'largest': v.stats.largest_source_bytes,
           'seconds': v.stats.load_seconds}
else:
    import time
    from mlx.utils import tree_flatten
    from mlx_lm import load
    t = time.perf_counter()
    model, tok = load(folder)
    model.set_dtype(getattr(mx, target))
    mx.eval(model.parameters())
    final = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    out = {'peak': mx.get_peak_memory() - base, 'final': final, 'seconds': time.perf_counter() - t}
print(json.dumps(out))
"""


def run(folder, target: str, method: str) -> dict:
    return child_json(_CHILD, str(folder), target, method)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["0.1", "1"])
    p.add_argument("--name", default="load_memory")
    a = p.parse_args(argv)
    rows = []
    for size in a.sizes:
        for source, target in CONVERSIONS:
            folder = ensure_model(CHECKPOINTS[(source, size)], source)
            file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            ours, naive = run(folder, target, "ours"), run(folder, target, "naive")
            row = {"size_gb": size, "source": source, "target": target, "file_bytes": file_bytes,
                   "final_bytes": ours["final"], "largest_tensor_bytes": ours["largest"],
                   "ours_peak_over_final": round(ours["peak"] / ours["final"], 4),
                   "ours_bound": round(1 + ours["largest"] / ours["final"], 4),
                   "naive_peak_over_final": round(naive["peak"] / naive["final"], 4),
                   "ours_seconds": round(ours["seconds"], 3), "naive_seconds": round(naive["seconds"], 3)}
            row["naive_over_ours_peak"] = round(naive["peak"] / ours["peak"], 3)
            rows.append(row)
            print(json.dumps(row))
    path = write_result(a.name, {"rows": rows})
    print(f"wrote {path.relative_to(ROOT)}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
