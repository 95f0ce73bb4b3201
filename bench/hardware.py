"""The serving benchmarks of one machine in one run (used on the H200; runs on a CPU too):

    python -m bench.hardware --shape llama-1b --dtypes bfloat16 float16 float32 --clients 1 8 32

Per dtype, side by side: batch-1 decode through the server vs stream_generate called directly;
aggregate tokens/s at each client count vs mlx-lm's BatchGenerator driven directly at the same
batch size (server and baselines loaded at once, their trials alternating; medians); decode as
a share of the memory-bandwidth limit; PyTorch + transformers `generate`
(if torch with CUDA is there). Also: time to first token of the first request after startup vs
the steady median, and the time until a second dtype is ready vs the first load.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx

from bench.baselines import BaselineProcess
from bench.common import (
    PROMPT,
    ROOT,
    ensure_model,
    free_port,
    generate_request,
    gpu_model_parser,
    load_run,
    load_session,
    numbered_prompt,
    server,
    write_result,
)


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_and_steady(base: str, model: str, tokens: int) -> dict:
    """TTFT of the first request after startup vs the median of later ones. Every prompt differs from
    its first character on, so none is served from the prefix cache; the server's own TTFT (arrival
    at the engine to first token) tells engine time from HTTP time."""
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    prompts = [numbered_prompt(i) for i in range(6)]

    async def run() -> dict:
        async def ttfts(session, prompt: str) -> tuple[float, float]:  # client's and server's
            r = await generate_request(session, f"{base}/generate", {**body, "prompt": prompt}, stream=True)
            return r["ttft_s"], r["server_ttft_s"]

        async with load_session(1) as session:
            async with session.get(f"{base}/health") as r:  # the client's own first-use costs are not the server's
                await r.read()
            first = await ttfts(session, prompts[0])
            steady = [await ttfts(session, p) for p in prompts[1:]]
            longer = await ttfts(session, "99 " + PROMPT * 2)
        median = statistics.median(t for t, _ in steady)
        server_median = statistics.median(s for _, s in steady)
        return {"first_ttft_s": round(first[0], 4), "steady_ttft_s": round(median, 4),
                "first_over_steady": round(first[0] / median, 3),
                "server_first_ttft_s": first[1], "server_steady_ttft_s": server_median,
                "new_length_ttft_s": round(longer[0], 4), "server_new_length_ttft_s": longer[1]}

    return asyncio.run(run())


def second_dtype(base: str, model: str, dtype: str, other: str) -> dict:
    memory = httpx.get(f"{base}/memory", timeout=60).json()
    first = next(v for v in memory["variants"] if v["dtype"] == dtype)
    start = time.perf_counter()
    r = httpx.post(f"{base}/models/load", json={"model": model, "dtype": other}, timeout=600)
    r.raise_for_status()
    wall = time.perf_counter() - start
    return {"first": dtype, "first_load_s": first["load_seconds"], "second": other,
            "second_ready_s": round(wall, 4), "second_loaded_from": r.json()["loaded_from"],
            "first_over_second": round(first["load_seconds"] / wall, 3)}


def worker_time(base: str, since: dict | None = None) -> dict:
    """The server's worker time by phase (and decode steps), or its growth since `since`."""
    worker = httpx.get(f"{base}/memory", timeout=60).json()["worker"]
    now = {**worker["seconds"], "decode_steps": worker["decode_steps"], "unmasked_steps": worker["unmasked_steps"]}
    return {k: v - since[k] for k, v in now.items()} if since else now


def worker_summary(rows: list[dict]) -> dict:
    """Where the worker spent the measured trials: share of its time per phase, ms per decode step."""
    total = {k: sum(r[k] for r in rows) for k in rows[0]}
    steps, unmasked = total.pop("decode_steps"), total.pop("unmasked_steps")
    wall = sum(total.values())
    return {"share": {k: round(v / wall, 3) for k, v in total.items()}, "decode_steps": steps,
            "unmasked_steps": unmasked,
            "ms_per_step": {k: round(v / steps * 1e3, 3) for k, v in total.items()} if steps else {}}


def serve_and_measure(folder, dtype: str, clients: list[int], tokens: int, batch: int, other: str | None,
                      trials: int, starts: int) -> dict:
    """The server and the direct baselines (in their own process) loaded side by side; after the
    first-request figures, baseline and server trials alternate, and medians are compared."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--model", str(folder), "--dtype", dtype, "--port", str(port),
           "--max-batch-size", str(batch), "--max-queue", "512", "--max-tokens-limit", str(tokens),
           "--log-level", "warning"]
    body = {"model": folder.name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    url = f"{base}/v1/completions"
    out: dict = {}
    runs: dict[str, list] = {}
    with BaselineProcess(str(folder), dtype) as baseline, server(cmd, f"{base}/health/ready"):
        out["first_request"] = first_and_steady(base, folder.name, tokens)
        for _ in range(trials + 1):  # trial 0 warms every path and batch size up
            for n in clients:
                if n == 1:
                    runs.setdefault("direct", []).append(baseline.direct(PROMPT, tokens))
                runs.setdefault(f"batchgen_{n}", []).append(baseline.batchgen(PROMPT, n, tokens))
                before = worker_time(base)
                runs.setdefault(f"server_{n}", []).append(asyncio.run(load_run(url, body, n, 1)))
                runs.setdefault(f"worker_{n}", []).append(worker_time(base, before))
        memory = httpx.get(f"{base}/memory", timeout=60).json()
        out["variant_bytes"] = next(v for v in memory["variants"] if v["dtype"] == dtype)["total_bytes"]
        out["device"] = memory["device"]
        if other:
            out["second_dtype"] = second_dtype(base, folder.name, dtype, other)
    firsts = [out["first_request"]]
    for _ in range(starts - 1):  # a first request is one sample per start: more starts, a steadier median
        with server(cmd, f"{base}/health/ready"):
            firsts.append(first_and_steady(base, folder.name, tokens))
    out["first_request"] = {**{key: statistics.median(f[key] for f in firsts) for key in firsts[0]},
                            "starts": len(firsts), "each_first_over_steady": [f["first_over_steady"] for f in firsts]}
    runs = {label: rows[1:] for label, rows in runs.items()}

    def median(label: str, key: str) -> float:
        return round(statistics.median(row[key] for row in runs[label]), 4)

    if 1 in clients:
        # Each trial's server / direct pair ran back to back: their ratio is spared the machine's drift
        # between trials (single batch-1 trials on the H200 are bimodal), as in bench.batch1.
        pairs = [s["single_stream_tok_s"] / d["tok_s"] for s, d in zip(runs["server_1"], runs["direct"], strict=True)]
        out["direct_batch1"] = {"tok_s": median("direct", "tok_s"), "ttft_s": median("direct", "ttft_s"),
                                "trials_tok_s": [round(r["tok_s"], 1) for r in runs["direct"]],
                                "paired_ratio": round(statistics.median(pairs), 3)}
    out["batchgen"] = {n: {"tok_s": median(f"batchgen_{n}", "tok_s"),
                           "trials_tok_s": [round(r["tok_s"], 1) for r in runs[f"batchgen_{n}"]]} for n in clients}
    out["clients"] = [{"clients": n, **{key: median(f"server_{n}", key) for key in
                                        ("aggregate_tok_s", "single_stream_tok_s", "ttft_p50_s", "ttft_p99_s")},
                       "trials_aggregate_tok_s": [r["aggregate_tok_s"] for r in runs[f"server_{n}"]],
                       "worker": worker_summary(runs[f"worker_{n}"])}
                      for n in clients]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = gpu_model_parser(__doc__, "hardware")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=5, help="alternating baseline / server trials per client count")
    p.add_argument("--starts", type=int, default=3, help="server starts for the first-request figures")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="device memory bandwidth, bytes/s")
    p.add_argument("--torch", action="store_true", help="also PyTorch + transformers generate (CUDA)")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    result: dict = {"shape": a.shape, "vocab": a.vocab, "tokens": a.tokens, "stored": "bfloat16", "dtypes": {}}
    for i, dtype in enumerate(a.dtypes):
        other = a.dtypes[(i + 1) % len(a.dtypes)] if len(a.dtypes) > 1 else None
        row: dict = {"server": serve_and_measure(folder, dtype, a.clients, a.tokens, max(a.clients), other,
                                                 a.trials, a.starts)}
        row["direct_batch1"], row["batchgen"] = row["server"].pop("direct_batch1", {}), row["server"].pop("batchgen")
        if a.torch:
            config = str(folder / "config.json")
            row["torch"] = {n: child("bench.torch_generate", config, dtype, str(n), str(a.tokens))
                            for n in sorted({1, max(a.clients)})}
        one = next((c for c in row["server"]["clients"] if c["clients"] == 1), None)  # --clients without 1
        direct = row["direct_batch1"].get("tok_s")
        row["ratios"] = {
            "server_batch1_vs_direct": round(one["single_stream_tok_s"] / direct, 3) if one and direct else None,
            "server_batch1_vs_direct_paired": row["direct_batch1"].get("paired_ratio"),
            **{f"server_vs_batchgen_at_{c['clients']}": round(c["aggregate_tok_s"] / row["batchgen"][c["clients"]]
                                                              ["tok_s"], 3) for c in row["server"]["clients"]},
            "batch1_share_of_bandwidth_limit": round(
                one["single_stream_tok_s"] * row["server"]["variant_bytes"] / a.bandwidth, 4) if one else None,
        }
        result["dtypes"][dtype] = row
        print(json.dumps({dtype: row["ratios"]}), flush=True)
        path = write_result(a.name, result)  # after each dtype: a run cut short keeps what it measured
    print(f"wrote {path.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
