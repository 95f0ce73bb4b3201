"""Where a lone stream's time goes, through the server vs `stream_generate` called directly:

    python -m bench.batch1 --shape llama-1b --dtypes bfloat16 float16 float32 --trials 21

One client sends one `POST /generate` after another (nothing else runs), streamed and as one JSON
answer in turn, alternating with a direct `stream_generate` call of the same prompt and length in
the baseline process. Per trial it
records the client's end-to-end time and the server's own (from the request's arrival in the engine
to its last token, from the final event), so the ratio to direct splits into the engine's part and
the HTTP part (parsing before, delivery after). Medians over the trials, and the median of the
per-pair ratios (each server trial over the direct trial just before it).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import statistics
import sys

from bench.baselines import BaselineProcess
from bench.common import (
    PROMPT,
    ensure_model,
    free_port,
    generate_request,
    gpu_model_parser,
    load_session,
    server,
    write_result,
)


def summary(pairs: list[tuple[dict, dict]]) -> dict:
    def med(values) -> float:
        return round(statistics.median(values), 4)

    direct = med(d["tok_s"] for d, _ in pairs)
    client_rate = med(s["tokens"] / s["total_s"] for _, s in pairs)
    engine_rate = med(s["tokens"] / s["server_total_s"] for _, s in pairs)
    return {
        "direct_tok_s": direct, "client_tok_s": client_rate, "engine_tok_s": engine_rate,
        "client_over_direct": round(client_rate / direct, 3), "engine_over_direct": round(engine_rate / direct, 3),
        "paired_client_over_direct": med(s["tokens"] / s["total_s"] / d["tok_s"] for d, s in pairs),
        "http_ms": med((s["total_s"] - s["server_total_s"]) * 1e3 for _, s in pairs),
        "ttft_ms": {"direct": med(d["ttft_s"] * 1e3 for d, _ in pairs),
                    "client": med(s["ttft_s"] * 1e3 for _, s in pairs),
                    "engine": med(s["server_ttft_s"] * 1e3 for _, s in pairs)},
        "trials": [{"direct_tok_s": round(d["tok_s"], 1), "client_tok_s": round(s["tokens"] / s["total_s"], 1),
                    "engine_tok_s": round(s["tokens"] / s["server_total_s"], 1)} for d, s in pairs],
    }


def measure(folder, dtype: str, tokens: int, trials: int, server_args: list[str]) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--model", str(folder), "--dtype", dtype, "--port", str(port),
           "--max-tokens-limit", str(tokens), "--log-level", "warning", *server_args]
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    pairs: dict[str, list[tuple[dict, dict]]] = {"stream": [], "json": []}

    async def client(baseline: BaselineProcess) -> None:
        for i in range(trials + 2):  # the first two warm both paths up
            for mode, rows in pairs.items():
                direct = baseline.direct(PROMPT, tokens)
                # a connection of its own: a direct run longer than the server's keep-alive (5 s) closed the
                # kept one under the client (ServerDisconnectedError on a slow CPU)
                async with load_session(1) as session:
                    served = await generate_request(session, f"{base}/generate", body, stream=mode == "stream")
                if i >= 2:
                    rows.append((direct, served))

    with BaselineProcess(str(folder), dtype) as baseline, server(cmd, f"{base}/health/ready"):
        asyncio.run(client(baseline))
    return {mode: summary(rows) for mode, rows in pairs.items()}


def main(argv: list[str] | None = None) -> dict:
    p = gpu_model_parser(__doc__, "batch1")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--stored-dtype", default="bfloat16", help="the generated checkpoint's dtype")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=21)
    p.add_argument("--server-args", default="", help="more options for the server, e.g. '--stream-interval-s 0.05'")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, a.stored_dtype, vocab=a.vocab)
    result: dict = {"shape": a.shape, "vocab": a.vocab, "stored_dtype": a.stored_dtype, "tokens": a.tokens,
                    "trials": a.trials,
                    "server_args": a.server_args, "dtypes": {}}
    for dtype in a.dtypes:
        result["dtypes"][dtype] = row = measure(folder, dtype, a.tokens, a.trials, shlex.split(a.server_args))
        print(json.dumps({dtype: {mode: {k: v for k, v in r.items() if k != "trials"} for mode, r in row.items()}}),
              flush=True)
        path = write_result(a.name, result)  # after each dtype: a run cut short keeps what it measured
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
