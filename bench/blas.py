"""float32 serving with an optimized BLAS (`--blas auto`) vs MLX's bundled reference BLAS
(`--blas none`), same model, same prompts, one run:

    python -m bench.blas [--shapes llama-25m llama-100m]

`--against PATH` compares with another BLAS library instead (e.g. the system OpenBLAS against the
OpenBLAS wheel that `auto` picks); `--trials N` alternates the two servers N times (medians).

Single-stream decode tokens/s, aggregate tokens/s at 8 concurrent clients, and prefill tokens/s of
a 512-token prompt (512 / time to first token), then float32 vs bfloat16 vs float16 with the
optimized BLAS (the dtype advice in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

import httpx

from bench.common import (
    ROOT,
    ensure_model,
    free_port,
    load_run,
    load_session,
    server,
    stream_completion,
    write_result,
)

DECODE_PROMPT = "The quick brown fox jumps over the lazy dog. "
PREFILL_PROMPT = ("abcdefghijklmnopqrstuvwxyz0123456789 " * 14)[:511]  # 511 chars + <bos> = 512 tokens


def measure(folder, dtype: str, blas: str, tokens: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--model", str(folder), "--dtype", dtype, "--blas", blas, "--port",
           str(port), "--max-batch-size", "8", "--log-level", "warning"]
    url = f"{base}/v1/completions"
    body = {"model": folder.name, "prompt": DECODE_PROMPT, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True}
    with server(cmd, f"{base}/health/ready", timeout=900):
        blas_used = httpx.get(f"{base}/memory", timeout=60).json()["device"]["blas"]
        single = asyncio.run(load_run(url, body, 1, 2))
        eight = asyncio.run(load_run(url, body, 8, 1))

        async def prefill() -> float:
            async with load_session(1) as session:
                prefill_body = {**body, "prompt": PREFILL_PROMPT, "max_tokens": 1}
                await stream_completion(session, url, prefill_body)  # warm this shape
                # a prompt that differs from its first character on: none of it comes from the prefix cache
                r = await stream_completion(session, url, {**prefill_body, "prompt": "#" + PREFILL_PROMPT[1:]})
            return 512 / r.ttft

        prefill_tok_s = asyncio.run(prefill())
    return {"blas": blas, "library": blas_used["library"], "threads": blas_used["threads"],
            "decode_tok_s": single["single_stream_tok_s"], "aggregate_8_tok_s": eight["aggregate_tok_s"],
            "prefill_512_tok_s": round(prefill_tok_s, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["llama-25m", "llama-100m"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--against", default="none", help="the BLAS compared with auto: none (reference) or a path")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--vocab", type=int, default=100)
    p.add_argument("--no-dtypes", action="store_true", help="skip the bfloat16 / float16 rows")
    p.add_argument("--name", default="blas", help="results file: bench/results/NAME.json")
    a = p.parse_args(argv)
    rows = []
    keys = ("decode_tok_s", "aggregate_8_tok_s", "prefill_512_tok_s")
    for shape in a.shapes:
        folder = ensure_model(shape, "float32", vocab=a.vocab, context=1024)
        trials = [(measure(folder, "float32", "auto", a.tokens), measure(folder, "float32", a.against, a.tokens))
                  for _ in range(a.trials)]
        fast = {**trials[0][0], **{k: statistics.median(t[0][k] for t in trials) for k in keys}}
        slow = {**trials[0][1], **{k: statistics.median(t[1][k] for t in trials) for k in keys}}
        row = {"shape": shape, "vocab": a.vocab, "auto": fast, "against": slow,
               "ratios": {k: round(fast[k] / slow[k], 2) for k in keys},
               "trials": [{"auto": {k: t[0][k] for k in keys}, "against": {k: t[1][k] for k in keys}} for t in trials]}
        if not a.no_dtypes:
            row["dtypes_with_optimized_blas"] = {d: measure(folder, d, "auto", a.tokens)
                                                 for d in ("bfloat16", "float16")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path = write_result(a.name, {"rows": rows})
    print(f"wrote {path.relative_to(ROOT)}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
