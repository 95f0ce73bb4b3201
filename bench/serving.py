"""Serving speed side by side, in one run: dtype-serve vs mlx_lm.server (vs vllm-mlx) vs stream_generate.

    python -m bench.serving --shape llama-25m --dtype bfloat16 --clients 1 4 8 16

Each server is started by the benchmark on the same model folder and dtype; all run at once and take
turns, trial after trial (medians over `--trials`). Single stream: end-to-end tokens/s of one client
through HTTP vs stream_generate (in a process of its own, taking its turn in each trial).
Concurrency: aggregate tokens/s and TTFT percentiles per client count.
Results: bench/results/serving-<shape>-<dtype>-blas_<blas>[-vocab<n>][-sampled][-distinct].json.
`--peers ours mlx_lm vllm_mlx` adds vllm-mlx, from its own venv (scripts/install-vllm-mlx.sh);
`--peers ours llama_cpp --gguf Q8_0` adds llama.cpp's llama-server (scripts/install-llama-cpp.sh) on the same
weights as GGUF (bench/gguf.py: F32, F16, Q8_0, Q4_0), sent the prompt as our tokenizer's token ids.
`--temperature 0.7 --top-p 0.9 --vocab 32000`: sampled requests on a model with a realistic vocabulary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
from contextlib import ExitStack

from bench.baselines import BaselineProcess
from bench.common import PROMPT, ROOT, ensure_model, free_port, load_run, rss_bytes, server, write_result
from models.platform.blas import _find_optimized


def ours(folder, dtype: str, port: int, blas: str, batch: int):
    cmd = [sys.executable, "-m", "server", "--model", str(folder), "--dtype", dtype, "--port", str(port),
           "--blas", blas, "--max-batch-size", str(batch), "--max-queue", "256", "--log-level", "warning"]
    return server(cmd, f"http://127.0.0.1:{port}/health/ready"), folder.name


def blas_env(blas: str) -> dict:
    # Same BLAS as ours, for a fair float32 comparison: preload it into the peer.
    lib = _find_optimized() if blas == "auto" else None
    return {"LD_PRELOAD": lib} if lib and sys.platform == "linux" else {}


def mlx_lm_server(folder, port: int, blas: str):
    env = blas_env(blas)
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port), "--log-level", "WARNING"]
    return server(cmd, f"http://127.0.0.1:{port}/v1/models", env=env), str(folder)


def vllm_mlx_server(folder, port: int, blas: str, batch: int):
    # Its own venv (it pins an older mlx-lm); the model loads before /v1/models answers.
    exe = ROOT / "bench" / ".venv-vllm-mlx" / "bin" / "vllm-mlx"
    if not exe.exists():
        raise SystemExit(f"{exe.relative_to(ROOT)} missing: run scripts/install-vllm-mlx.sh first")
    cmd = [str(exe), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--offline",
           "--continuous-batching", "--completion-batch-size", str(batch)]
    return server(cmd, f"http://127.0.0.1:{port}/v1/models", env=blas_env(blas)), str(folder)


def llama_cpp_server(folder, port: int, gguf_type: str, clients: int, extra: tuple[str, ...] = ()):
    from bench.gguf import LLAMA_CPP, ensure_gguf

    exe = LLAMA_CPP / "llama-server"
    if not exe.exists():
        raise SystemExit(f"{exe} missing: run scripts/install-llama-cpp.sh first")
    model = ensure_gguf(folder, gguf_type)
    slots = max(clients, 1)
    cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-cb",
           "-c", str(1024 * slots), "--ignore-eos", *extra]
    return server(cmd, f"http://127.0.0.1:{port}/health"), model.stem


def prompt_ids(folder, prompt: str = PROMPT) -> list[int]:
    """`prompt` as our tokenizer's ids: llama.cpp is sent these, so both servers see the same tokens."""
    from mlx_lm.tokenizer_utils import load

    return load(folder).encode(prompt)


def body(model_id: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    return {"model": model_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}


def start_peer(stack: ExitStack, peer: str, folder, dtype: str, blas: str, batch: int,
               gguf_type: str = "F32", llama_cpp_args: tuple[str, ...] = ()) -> tuple[str, str, int]:
    """Start one server; its /v1/completions URL, the model id it answers to and its process id."""
    port = free_port()
    if peer == "llama_cpp":
        ctx, model_id = llama_cpp_server(folder, port, gguf_type, batch, llama_cpp_args)
    else:
        ctx, model_id = ours(folder, dtype, port, blas, batch) if peer == "ours" else \
            mlx_lm_server(folder, port, blas) if peer == "mlx_lm" else vllm_mlx_server(folder, port, blas, batch)
    proc = stack.enter_context(ctx)
    return f"http://127.0.0.1:{port}/v1/completions", model_id, proc.pid


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-25m")
    p.add_argument("--dtype", default="bfloat16", help="stored dtype of the generated model, served as is")
    p.add_argument("--serve-dtype", help="the precision ours and stream_generate serve it at (q8, q4:float32; "
                   "quantized as mlx_lm.convert would): default --dtype; mlx_lm and vllm_mlx serve --dtype")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--peers", nargs="+", default=["ours", "mlx_lm"],
                   choices=["ours", "mlx_lm", "vllm_mlx", "llama_cpp"])
    p.add_argument("--gguf", default="F32", choices=["F32", "F16", "Q8_0", "Q4_0"],
                   help="llama_cpp: the GGUF type its weights are written in")
    p.add_argument("--llama-cpp-args", default="", help="more llama-server options, e.g. '--no-repack' (on a "
                   "VM that advertises AMX but does not allow it, its repacked Q8_0/Q4_0 kernels die with SIGILL)")
    p.add_argument("--blas", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--trials", type=int, default=3, help="rounds in which every server takes its turn")
    p.add_argument("--name", help="results file: bench/results/NAME.json (default: from shape, dtype and options)")
    p.add_argument("--vocab", type=int, default=100, help="vocabulary of the generated model (100: characters)")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled requests (the direct baseline "
                   "stays greedy, so the single-stream ratio is left out)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--distinct-prompts", action="store_true",
                   help="a different prompt per request: no server can reuse a cached prompt prefix")
    a = p.parse_args(argv)
    if "llama_cpp" in a.peers and a.distinct_prompts:
        p.error("--distinct-prompts prefixes text; llama_cpp is sent token ids")
    folder = ensure_model(a.shape, a.dtype, vocab=a.vocab)
    served = a.serve_dtype or a.dtype
    result = {"shape": a.shape, "dtype": a.dtype, "serve_dtype": served, "vocab": a.vocab, "blas": a.blas,
              "max_tokens": a.max_tokens,
              "gguf": a.gguf if "llama_cpp" in a.peers else None, "llama_cpp_args": a.llama_cpp_args,
              "prompt_chars": len(PROMPT), "distinct_prompts": a.distinct_prompts,
              "temperature": a.temperature, "top_p": a.top_p}
    sampled = a.temperature > 0
    # Every server runs at once (idle between turns); in each trial and client count they take turns
    # (in a rotating order) on the same prompts, so drift of a shared machine hits each alike.
    runs: dict[tuple[str, int], list[dict]] = {}
    direct: list[float] = []  # stream_generate in a process of its own, in each trial's one-client turn
    with ExitStack() as stack:
        baseline = stack.enter_context(BaselineProcess(str(folder), served, a.blas))
        baseline.direct(PROMPT, a.max_tokens)  # warm-up
        peers = {}  # peer: its /v1/completions URL and the request body it is sent
        pids = {}
        for peer in a.peers:
            url, model_id, pids[peer] = start_peer(stack, peer, folder, served if peer == "ours" else a.dtype,
                                                   a.blas, a.batch, a.gguf, tuple(shlex.split(a.llama_cpp_args)))
            peers[peer] = url, body(model_id, a.max_tokens, a.temperature, a.top_p)
            if peer == "llama_cpp":
                peers[peer][1]["prompt"] = prompt_ids(folder)
        for peer, (url, request) in peers.items():  # warm-up
            asyncio.run(load_run(url, request, 1, 2, a.distinct_prompts, seed=-1,
                                 fresh_connections=peer == "llama_cpp"))
        # resident memory once loaded and warmed (one request each), and after the run
        result["rss_after_load_bytes"] = {peer: rss_bytes(pid) for peer, pid in pids.items()}
        for trial in range(a.trials):
            for n in a.clients:
                if n == 1 and not sampled:
                    direct += [baseline.direct(PROMPT, a.max_tokens)["tok_s"] for _ in range(a.requests_per_client)]
                order = a.peers[trial % len(a.peers):] + a.peers[:trial % len(a.peers)]
                for peer in order:
                    url, request = peers[peer]
                    # llama-server closes the connection after a stream: reusing it failed every second request
                    runs.setdefault((peer, n), []).append(asyncio.run(load_run(
                        url, request, n, a.requests_per_client, a.distinct_prompts, seed=trial * 1000 + n,
                        fresh_connections=peer == "llama_cpp")))
        result["rss_end_bytes"] = {peer: rss_bytes(pid) for peer, pid in pids.items()}
    if direct:
        result["direct"] = {"tok_s": round(statistics.median(direct), 2), "runs_tok_s": [round(d, 1) for d in direct]}
    for peer in a.peers:
        result[peer] = [{"clients": n, **{key: round(statistics.median(r[key] for r in runs[(peer, n)]), 4)
                                          for key in ("aggregate_tok_s", "single_stream_tok_s", "ttft_p50_s",
                                                      "ttft_p99_s")},
                         "trials_aggregate_tok_s": [r["aggregate_tok_s"] for r in runs[(peer, n)]],
                         "errors": sum(r["errors"] for r in runs[(peer, n)])}
                        for n in a.clients]
    ratios = {}
    if "ours" in result:
        if direct:
            one = next(r for r in result["ours"] if r["clients"] == 1)
            ratios["single_stream_vs_direct"] = round(one["single_stream_tok_s"] / result["direct"]["tok_s"], 3)
        peers = [p for p in ("mlx_lm", "vllm_mlx", "llama_cpp") if p in result]
        for peer in peers:
            for mine, theirs in zip(result["ours"], result[peer], strict=True):
                ratios[f"aggregate_vs_{peer}_at_{mine['clients']}"] = round(
                    mine["aggregate_tok_s"] / theirs["aggregate_tok_s"], 3)
        mlx_peers = [p for p in peers if p != "llama_cpp"]  # "the better peer": the better MLX server
        for i, mine in enumerate(result["ours"] if mlx_peers else []):
            best = max(result[peer][i]["aggregate_tok_s"] for peer in mlx_peers)
            ratios[f"aggregate_vs_best_peer_at_{mine['clients']}"] = round(mine["aggregate_tok_s"] / best, 3)
    result["ratios"] = ratios
    path = write_result(a.name or f"serving-{a.shape}-{a.dtype}-blas_{a.blas}"
                        + (f"-vocab{a.vocab}" if a.vocab != 100 else "") + ("-sampled" if sampled else "")
                        + ("-distinct" if a.distinct_prompts else ""), result)
    print(json.dumps(result, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
