"""One quantized layer on a GPU, per shape, quantization and row count: MLX's `quantized_matmul` vs a transient
copy of the weight in the input's dtype and one GEMM (models/decode/gpu_quantized.py) vs the float layer.

    python -m bench.quantized_gpu --shapes 4096x4096 2048x5632 5632x2048 --rows 1 8 32 64 128 256 512 2048

Each case takes its three paths in turn, rounds interleaved; the figure is the median over rounds of the time per
call (synchronized), and the ratios are over the float layer's. It shows where MIN_ROWS sits: the rows from which
the copy beats quantized_matmul. Results: bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

QUANTIZATIONS = {"q8": ("affine", 8, 64), "q4": ("affine", 4, 64), "mxfp8": ("mxfp8", 8, 32),
                 "mxfp4": ("mxfp4", 4, 32), "nvfp4": ("nvfp4", 4, 16)}


def _paths(mx, x, weight, packed, mode: str, bits: int, group: int, dtype) -> dict:
    """The three ways to compute x @ weight.T, each a callable."""
    def quantized():
        return mx.quantized_matmul(x, *packed, transpose=True, group_size=group, bits=bits, mode=mode)

    def copy_gemm():
        return x @ mx.dequantize(*packed, group_size=group, bits=bits, mode=mode, dtype=dtype).T

    return {"float_ms": lambda: x @ weight.T, "quantized_matmul_ms": quantized, "copy_gemm_ms": copy_gemm}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "2048x5632", "5632x2048"], help="IN x OUT")
    p.add_argument("--quantizations", nargs="+", default=list(QUANTIZATIONS), choices=list(QUANTIZATIONS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="calls per round")
    p.add_argument("--name", default="quantized-gpu")
    a = p.parse_args(argv)
    import mlx.core as mx

    from bench.common import write_result
    from models.decode.gpu_quantized import MIN_ROWS

    dtype = getattr(mx, a.dtype)

    def timed(fn) -> float:
        mx.eval(fn())
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(a.calls):
            mx.eval(fn())
        mx.synchronize()
        return (time.perf_counter() - start) / a.calls * 1e3

    rows_out = []
    for shape in a.shapes:
        in_dims, out_dims = (int(s) for s in shape.split("x"))
        weight = (mx.random.normal((out_dims, in_dims)) * in_dims ** -0.5).astype(dtype)
        for name in a.quantizations:
            mode, bits, group = QUANTIZATIONS[name]
            packed = mx.quantize(weight, group_size=group, bits=bits, mode=mode)
            mx.eval(packed)
            for rows in a.rows:
                x = mx.random.normal((rows, in_dims)).astype(dtype)
                mx.eval(x)
                paths = _paths(mx, x, weight, packed, mode, bits, group, dtype)
                times: dict[str, list[float]] = {k: [] for k in paths}
                for _ in range(a.rounds):
                    for key, fn in paths.items():
                        times[key].append(timed(fn))
                row = {"shape": shape, "quantization": name, "rows": rows,
                       **{k: round(statistics.median(v), 4) for k, v in times.items()}}
                row["quantized_matmul_vs_float"] = round(row["quantized_matmul_ms"] / row["float_ms"], 2)
                row["copy_gemm_vs_float"] = round(row["copy_gemm_ms"] / row["float_ms"], 2)
                row["used"] = "copy_gemm" if rows >= MIN_ROWS else "quantized_matmul"
                rows_out.append(row)
                print(row, flush=True)
    result = {"device": str(mx.default_device()), "dtype": a.dtype, "min_rows": MIN_ROWS, "rows": rows_out}
    print(write_result(a.name, result))
    return result


if __name__ == "__main__":
    main()
