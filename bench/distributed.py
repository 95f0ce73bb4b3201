"""Two tensor-parallel ranks (mlx.launch, ring backend over 127.0.0.1) vs one process on the same model:
single-stream and 8-client tokens/s, and the weight bytes each rank holds. Both servers run at once and
take turns, trial by trial.

On one machine this measures the cost of the split (an all_sum per sharded layer per step, over loopback,
with two processes sharing the same cores), not what a cluster gains: the point is memory per rank.

    python -m bench.distributed --shape llama-25m --dtype float32 --clients 1 8 --trials 2 --name distributed-cpu
    python -m bench.distributed --backend nccl --shape llama-1b --dtype bfloat16 --name distributed-gpu  # 2 GPUs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys

import httpx

from bench.common import PROMPT, RESULTS, ROOT, SHAPES, ensure_model, free_port, load_run, server, write_result


def _memory(base: str) -> dict:
    report = httpx.get(f"{base}/memory", timeout=60).json()
    variant = report["variants"][0]
    out = {"model_bytes": variant["total_bytes"], "active_bytes": report["process"]["active_bytes"]}
    if "distributed" in report:
        ranks = report["distributed"]["ranks"]
        out["per_rank"] = [{"rank": r["rank"], "weights_bytes": r["weights_bytes"], "active_bytes": r["active_bytes"],
                            "peak_bytes": r["peak_bytes"]} for r in ranks]
        out["weights_bytes_sum"] = report["distributed"]["weights_bytes_sum"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-25m", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--name", default="distributed-cpu")
    parser.add_argument("--backend", default="ring", choices=("ring", "nccl"),
                        help="nccl: two GPUs of one CUDA machine (through mlx.launch)")
    parser.add_argument("--launcher", action="store_true",
                        help="start the ranks with `dtype-serve launch` (mlx.launch; its I/O loop polls, taking "
                        "~20%% of a core here) instead of directly with mlx.launch's environment variables")
    args = parser.parse_args(argv)

    folder = ensure_model(args.shape, args.dtype)
    common = ["--model", str(folder), "--dtype", args.dtype, "--log-level", "warning"]
    single_port, group_port, ring_port = free_port(), free_port(), free_port()
    single_cmd = [sys.executable, "-m", "server", "--port", str(single_port), *common]
    if args.launcher or args.backend != "ring":
        args.launcher = True
        group_cmd = [sys.executable, "-m", "server", "launch", "-n", "2", "--backend", args.backend,
                     f"--launcher-arg=--starting-port={ring_port}", "--", "--port", str(group_port), *common]
    else:  # rank 1 in the background, rank 0 as the server process: what mlx.launch sets up, minus its I/O loop
        hostfile = RESULTS / f"hosts-{os.getpid()}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{ring_port}"], [f"127.0.0.1:{free_port()}"]]))
        rank_cmd = [sys.executable, "-m", "server", "--port", str(group_port), *common, "--distributed", "tensor",
                    "--distributed-backend", "ring"]
        group_cmd = ["env", f"MLX_HOSTFILE={hostfile}", "MLX_RANK=0", *rank_cmd]
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0}
    runs: dict[str, dict[int, list[dict]]] = {"one_process": {}, "two_ranks": {}}
    bases = {"one_process": f"http://127.0.0.1:{single_port}", "two_ranks": f"http://127.0.0.1:{group_port}"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(server(single_cmd, f"{bases['one_process']}/health/ready"))
        if not args.launcher:  # started with rank 0: a ring rank waits for its peers only so long
            follower = subprocess.Popen(rank_cmd, cwd=ROOT, env={**os.environ, "MLX_HOSTFILE": str(hostfile),
                                                                 "MLX_RANK": "1"},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.enter_context(server(group_cmd, f"{bases['two_ranks']}/health/ready"))
        for trial in range(args.trials):
            for clients in args.clients:
                for name, base in bases.items():  # alternating: the same load on the machine for both
                    result = asyncio.run(load_run(f"{base}/v1/completions", body, clients,
                                                  args.requests_per_client, seed=trial))
                    runs[name].setdefault(clients, []).append(result)
                    print(name, clients, result["aggregate_tok_s"], result["single_stream_tok_s"], flush=True)
        memory = {name: _memory(base) for name, base in bases.items()}
    if not args.launcher:
        follower.wait(timeout=60)  # rank 0's stop tells it to leave
        hostfile.unlink()
    summary = {}
    for clients in args.clients:
        one = statistics.median(r["aggregate_tok_s"] for r in runs["one_process"][clients])
        two = statistics.median(r["aggregate_tok_s"] for r in runs["two_ranks"][clients])
        summary[f"{clients}_clients"] = {"one_process_tok_s": one, "two_ranks_tok_s": two,
                                         "two_ranks_over_one": round(two / one, 3)}
    whole = memory["one_process"]["model_bytes"]
    summary["weights_per_rank_over_whole"] = [round(r["weights_bytes"] / whole, 4)
                                              for r in memory["two_ranks"]["per_rank"]]
    path = write_result(args.name, {"args": vars(args), "summary": summary, "memory": memory,
                                    "runs": {k: {str(c): v for c, v in r.items()} for k, r in runs.items()}})
    print(summary)
    print(path)


if __name__ == "__main__":
    main()
