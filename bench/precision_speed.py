"""Speed per precision through the server, side by side in one run: one server, every precision of the same
weights resident in turn, each measured at one client and at `--clients` concurrent ones, in rotating order.

    python -m bench.precision_speed --shape llama-100m --vocab 32000 --precisions bfloat16 q8 q4 --clients 8

The model is generated in `--dtype` (float32 by default: the CPU's fastest float) and each precision is
loaded from it; ratios are against the first precision given. Results: bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

import httpx

from bench.common import PROMPT, ensure_model, free_port, load_run, server, write_result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-100m")
    p.add_argument("--dtype", default="float32", help="stored dtype of the generated model")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--precisions", nargs="+", default=["float32", "q8", "q4"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--name", default="precision-speed")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, a.dtype, vocab=a.vocab)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--model", str(folder), "--dtype", a.precisions[0], "--port", str(port),
           "--max-batch-size", str(max(a.clients, 1)), "--max-queue", "256", "--log-level", "warning"]
    runs: dict[tuple[str, int], list[dict]] = {}
    loaded: dict[str, dict] = {}
    with server(cmd, f"{base}/health/ready"):
        for precision in a.precisions:  # all resident (the budget allowing), each warmed by its load
            loaded[precision] = httpx.post(f"{base}/models/load", json={"dtype": precision}, timeout=600).json()
        url = f"{base}/v1/completions"
        bodies = {prec: {"model": f"{folder.name}:{prec}", "prompt": PROMPT, "max_tokens": a.max_tokens,
                         "temperature": 0.0, "ignore_eos": True} for prec in a.precisions}
        for body in bodies.values():
            asyncio.run(load_run(url, body, 1, 1, seed=-1))
        for trial in range(a.trials):
            order = a.precisions[trial % len(a.precisions):] + a.precisions[:trial % len(a.precisions)]
            for n in (1, a.clients):
                for prec in order:
                    runs.setdefault((prec, n), []).append(
                        asyncio.run(load_run(url, bodies[prec], n, a.requests_per_client, seed=trial * 1000 + n)))
    result: dict = {"shape": a.shape, "stored_dtype": a.dtype, "vocab": a.vocab, "max_tokens": a.max_tokens,
                    "trials": a.trials, "requests_per_client": a.requests_per_client, "clients": a.clients,
                    "precisions": {}}
    for prec in a.precisions:
        info = loaded[prec]
        result["precisions"][prec] = {
            "total_bytes": info.get("total_bytes"), "bits_per_weight": info.get("bits_per_weight"),
            "load_seconds": info.get("load_seconds"), "warmup_seconds": info.get("warmup_seconds"),
            **{f"{key}_at_{n}": round(statistics.median(r[key] for r in runs[(prec, n)]), 3)
               for n in (1, a.clients) for key in ("aggregate_tok_s", "ttft_p50_s")},
            "errors": sum(r["errors"] for n in (1, a.clients) for r in runs[(prec, n)])}
    first = result["precisions"][a.precisions[0]]
    result["ratios_vs_" + a.precisions[0]] = {
        prec: {key: round(v[key] / first[key], 3) for key in ("aggregate_tok_s_at_1", f"aggregate_tok_s_at_{a.clients}",
                                                             "total_bytes") if first.get(key)}
        for prec, v in result["precisions"].items()}
    path = write_result(a.name, result)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
