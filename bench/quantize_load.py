"""Peak memory and time of loading a float32 checkpoint quantized: quantized while loading (ours)
vs mlx_lm.load + quantize_model (naive), and deriving the quantized variant from a resident float32
one (no file read) vs a first load from the file.

    python -m bench.quantize_load [--shape llama-25m] [--targets q8 q4]

Each measurement runs in a fresh process so that MLX's peak counter and cache start clean.
Reports peak / final, ours' bound 1 + largest tensor / final, and the seconds of each.
"""

from __future__ import annotations

import argparse
import json

from bench.common import ROOT, SHAPES, child_json, ensure_model, write_result

_CHILD = """
import json, sys, gc, time
from models.platform.blas import configure_blas; configure_blas('auto')
import mlx.core as mx
from pathlib import Path
folder, target, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
gc.collect(); mx.clear_cache(); base = mx.get_active_memory(); mx.reset_peak_memory()
if method == 'ours':
    from models.weights.loader import load_variant
    v = load_variant('bench', folder, target)
    out = {'peak': v.stats.peak_bytes, 'final': v.stats.final_bytes, 'largest': v.stats.largest_source_bytes,
           'seconds': v.stats.load_seconds}
elif method == 'derive':
    from models.weights.loader import derive_variant, load_variant
    source = load_variant('bench', folder, 'float32')
    v = derive_variant(source, target)
    out = {'peak': v.stats.peak_bytes, 'final': v.stats.final_bytes, 'seconds': v.stats.load_seconds,
           'source_seconds': source.stats.load_seconds}
else:
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm import load
    from mlx_lm.utils import quantize_model
    from models.weights.dtypes import parse_precision
    q = parse_precision(target).quantization
    t = time.perf_counter()
    model, tok, config = load(str(folder), return_config=True)
    model.update(tree_map(lambda a: a.astype(mx.bfloat16), model.parameters()))
    model, _ = quantize_model(model, config, q.group_size, q.bits, mode=q.mode)
    mx.eval(model.parameters())
    final = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    out = {'peak': mx.get_peak_memory() - base, 'final': final, 'seconds': time.perf_counter() - t}
print(json.dumps(out))
"""


def run(folder, target: str, method: str) -> dict:
    return child_json(_CHILD, str(folder), target, method)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-25m", choices=sorted(SHAPES))
    p.add_argument("--targets", nargs="+", default=["q8", "q4"])
    p.add_argument("--name", default="quantize_load")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, "float32")
    file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    rows = []
    for target in a.targets:
        ours, naive, derived = run(folder, target, "ours"), run(folder, target, "naive"), run(folder, target, "derive")
        row = {"shape": a.shape, "source": "float32", "target": target, "file_bytes": file_bytes,
               "final_bytes": ours["final"], "largest_tensor_bytes": ours["largest"],
               "ours_peak_over_final": round(ours["peak"] / ours["final"], 4),
               "ours_bound": round(1 + ours["largest"] / ours["final"], 4),
               "naive_peak_over_final": round(naive["peak"] / naive["final"], 4),
               "derived_peak_over_final": round(derived["peak"] / derived["final"], 4),
               "ours_seconds": round(ours["seconds"], 3), "naive_seconds": round(naive["seconds"], 3),
               "derived_seconds": round(derived["seconds"], 3),
               "derived_over_first_load_seconds": round(derived["seconds"] / ours["seconds"], 3)}
        rows.append(row)
        print(json.dumps(row))
    path = write_result(a.name, {"rows": rows})
    print(f"wrote {path.relative_to(ROOT)}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
