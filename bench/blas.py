"""float32 serving with an optimized BLAS (`--blas auto`) vs MLX's bundled reference BLAS
(`--blas none`), same model, same prompts, one run:

    python -m bench.blas [--shapes llama-25m llama-100m]

Single-stream decode tokens/s, aggregate tokens/s at 8 concurrent clients, and prefill tokens/s of
a 512-token prompt (512 / time to first token), then float32 vs bfloat16 vs float16 with the
optimized BLAS (the dtype advice in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
                r = await stream_completion(session, url, prefill_body)
            return 512 / r.ttft

        prefill_tok_s = asyncio.run(prefill())
    return {"blas": blas, "library": blas_used["library"], "threads": blas_used["threads"],
            "decode_tok_s": single["single_stream_tok_s"], "aggregate_8_tok_s": eight["aggregate_tok_s"],
            "prefill_512_tok_s": round(prefill_tok_s, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["llama-25m", "llama-100m"])
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args(argv)
    rows = []
    for shape in a.shapes:
        folder = ensure_model(shape, "float32", context=1024)
        fast, slow = measure(folder, "float32", "auto", a.tokens), measure(folder, "float32", "none", a.tokens)
        row = {"shape": shape, "auto": fast, "none": slow, "ratios": {
            k: round(fast[k] / slow[k], 2) for k in ("decode_tok_s", "aggregate_8_tok_s", "prefill_512_tok_s")}}
        row["dtypes_with_optimized_blas"] = {d: measure(folder, d, "auto", a.tokens) for d in ("bfloat16", "float16")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path = write_result("blas", {"rows": rows})
    print(f"wrote {path.relative_to(ROOT)}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
