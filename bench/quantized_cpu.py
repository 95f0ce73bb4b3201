"""One quantized layer on the CPU, per shape, bits and row count: MLX's own `quantized_matmul` (what mlx-lm runs)
vs the paths of the batching layer (models/decode/cpu_quantized.py) vs the same layer in float32 (nn.Linear,
OpenBLAS). The layer's paths: the forwarding BLAS's kernel reading the packed weight (up to KERNEL_MAX_ROWS rows),
and, beyond it or without the kernel, a transient float32 copy and one GEMM (from MIN_ROWS[bits] rows) or a
single row through quantized_matmul in float32.

    python -m bench.quantized_cpu --shapes 1024x1024 1024x2816 2816x1024 --bits 8 4 --rows 1 2 4 8 32

Each (shape, bits, dtype) takes its paths in turn, rounds interleaved; the figure is the median over rounds of
the time per call, and the ratios are over float32's. It shows where KERNEL_MAX_ROWS and MIN_ROWS sit and what a
row costs each path. Results: bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from models.platform.blas import blas_info, configure_blas


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["1024x1024", "1024x2816", "2816x1024"],
                   help="IN x OUT of a Linear layer")
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="the layer's float dtype")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 32])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5, help="calls per round")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="OpenBLAS threads (default: its own choice); 1 on a loaded machine, where a second thread "
                        "waits for a core")
    p.add_argument("--name", default="quantized-cpu")
    a = p.parse_args(argv)
    if a.blas_threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(a.blas_threads)  # read when the library loads
    configure_blas()
    import mlx.core as mx
    import mlx.nn as nn

    from bench.common import write_result
    from models.decode.cpu_quantized import KERNEL_MAX_ROWS, MIN_ROWS, dequantized_matmul, float32_quantized_matmul
    from models.platform.quantized_kernel import quantized_kernel

    mx.set_default_device(mx.cpu)

    def timed(fn, x) -> float:
        start = time.perf_counter()
        for _ in range(a.calls):
            mx.eval(fn(x))
        return (time.perf_counter() - start) / a.calls * 1e3

    results = []
    for shape in a.shapes:
        in_dims, out_dims = map(int, shape.split("x"))
        for dtype_name in a.dtypes:
            dtype = getattr(mx, dtype_name)
            linear = nn.Linear(in_dims, out_dims, bias=False)
            linear.set_dtype(mx.float32)
            for bits in a.bits:
                q = nn.QuantizedLinear.from_linear(linear, 64, bits)
                q.set_dtype(dtype)  # scales and biases in the layer's dtype, as a quantized variant keeps them
                mx.eval(q.parameters(), linear.parameters())
                args = (q.weight, q.scales, q.biases, q.group_size, bits)
                kernel = quantized_kernel() and quantized_kernel().weight(*args)
                paths = {
                    "mlx_quantized_matmul": q,
                    "quantized_matmul_float32": lambda x, args=args: float32_quantized_matmul(x, *args, "affine"),
                    "float32_copy_gemm": lambda x, args=args: dequantized_matmul(x, *args),
                    "float32_linear": lambda x, linear=linear: linear(x.astype(mx.float32)),
                }
                if kernel:
                    paths["kernel"] = kernel.matmul
                for rows in a.rows:
                    x = mx.random.normal((rows, in_dims)).astype(dtype)
                    for fn in paths.values():
                        timed(fn, x)
                    times: dict[str, list[float]] = {k: [] for k in paths}
                    for _ in range(a.rounds):
                        for k, fn in paths.items():
                            times[k].append(timed(fn, x))
                    ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
                    used = "float32_copy_gemm" if rows >= MIN_ROWS[bits] else "quantized_matmul_float32"
                    if kernel and rows <= KERNEL_MAX_ROWS:
                        used = "kernel"
                    row = {"shape": shape, "dtype": dtype_name, "bits": bits, "rows": rows, "ms": ms, "used": used,
                           "used_over_mlx": round(ms[used] / ms["mlx_quantized_matmul"], 3),
                           "over_float32": {k: round(v / ms["float32_linear"], 2) for k, v in ms.items()},
                           "fastest": min(set(ms) - {"float32_linear"}, key=ms.get)}
                    results.append(row)
                    print(json.dumps(row))
    result = {"min_rows": MIN_ROWS, "kernel_max_rows": KERNEL_MAX_ROWS, "kernel": quantized_kernel() is not None,
              "blas": blas_info().as_dict(), "blas_threads_asked": a.blas_threads, "rounds": a.rounds, "calls": a.calls,
              "layers": results}
    path = write_result(a.name, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
