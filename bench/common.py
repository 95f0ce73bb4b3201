"""Shared pieces of the benchmarks: generated models, servers started as processes, load clients."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import string
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "bench" / "models"
RESULTS = ROOT / "bench" / "results"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 2  # the benchmarks' shared prompt


def numbered_prompt(i: int) -> str:
    """PROMPT led by a two-digit number: prompts that differ from their first character, so that no
    request's prefix comes from another's cache (first-request benchmarks)."""
    return f"{i:02d} {PROMPT}"


# llama shapes used across benchmarks (character vocabulary of the bundled tokenizer)
SHAPES = {
    "llama-tiny": dict(hidden=64, layers=2, intermediate=128),  # next to no compute: per-token overhead
    "llama-25m": dict(hidden=512, layers=8, intermediate=1408),
    "llama-50m": dict(hidden=512, layers=16, intermediate=1408),
    "llama-100m": dict(hidden=1024, layers=8, intermediate=2816),
    "llama-250m": dict(hidden=2048, layers=5, intermediate=5632),
    "llama-500m": dict(hidden=2048, layers=10, intermediate=5632),
    "llama-1b": dict(hidden=2048, layers=16, intermediate=5632),
}


def ensure_model(shape: str, dtype: str = "bfloat16", vocab: int = 100, context: int = 4096) -> Path:
    """A random-weight llama in the mlx-lm layout, generated once under bench/models/ (the folder
    names a vocabulary other than the character tokenizer's 100)."""
    folder = MODELS / (f"{shape}-{dtype}" if vocab == 100 else f"{shape}-{dtype}-vocab{vocab}")
    if (folder / "model.safetensors").exists():
        return folder
    code = ("from models.platform.blas import configure_blas; configure_blas('auto');"
            "import sys, json; from pathlib import Path;"
            "from models.testing.synthetic import llama_config, make_llama_checkpoint;"
            "a = json.loads(sys.argv[1]);"
            "make_llama_checkpoint(Path(a['folder']), llama_config(a['hidden'], a['layers'], a['vocab'],"
            " a['intermediate'], context=a['context']), dtype=a['dtype'])")
    args = {**SHAPES[shape], "folder": str(folder), "vocab": vocab, "dtype": dtype, "context": context}
    subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, check=True)
    return folder


def gpu_model_parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """The options of the GPU benchmarks' generated model (a 1B llama by default), and --name."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--name", default=name, help="results file: bench/results/NAME.json")
    return p


def environment() -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "versions": {p: version(p) for p in ("mlx", "mlx-cpu", "mlx-cuda-13", "mlx-lm", "dtype-serve")}}


def child_json(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python process (in the project root) and parse the JSON its last line prints:
    each measurement of load memory needs a process whose MLX peak counter saw nothing else."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux: VmRSS)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2))
    return path


@contextmanager
def server(cmd: list[str], ready_url: str, env: dict | None = None, timeout: float = 600, cwd: Path = ROOT):
    """Start a server process in `cwd`, wait until `ready_url` answers 200, stop it afterwards."""
    port = ready_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[-1]
    log = open(RESULTS / f"server-{os.getpid()}-{port}.log", "w")  # one per server: several may run at once
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[:3]} not ready")
            time.sleep(0.25)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RequestResult:
    ttft: float
    total: float
    tokens: int


async def sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON payloads of a server-sent event stream (`data: ...` lines, up to `[DONE]`)."""
    async for raw in response.content:  # one line at a time
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    """One streamed /v1/completions request: time to first text, total time, completion tokens."""
    start = time.perf_counter()
    ttft, tokens, chunks = None, None, 0
    async with session.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for data in sse_data(r):
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    return RequestResult(ttft or total, total, tokens if tokens is not None else chunks)


async def generate_request(session: aiohttp.ClientSession, url: str, body: dict, stream: bool) -> dict:
    """One POST /generate, streamed or not: the client's total and first-text times (the total for a
    JSON answer), and the server's own timings (from the final event or the JSON answer)."""
    start, first, final = time.perf_counter(), None, None
    async with session.post(url, json={**body, "stream": stream}) as r:
        r.raise_for_status()
        if not stream:
            final = await r.json()
        else:
            async for data in sse_data(r):
                if data.get("text") and first is None:
                    first = time.perf_counter() - start
                if "usage" in data:
                    final = data
    total = time.perf_counter() - start
    return {"total_s": total, "ttft_s": first or total, "tokens": final["usage"]["completion_tokens"],
            "server_total_s": final["timings"]["total_s"], "server_ttft_s": final["timings"]["time_to_first_token_s"]}


def load_session(clients: int, fresh_connections: bool = False) -> aiohttp.ClientSession:
    """The load client: aiohttp, as vLLM's serving benchmark uses. httpx took ~2 ms of client time
    per request, so 32 concurrent requests spent ~50 ms in the client before any server saw them.
    `fresh_connections`: a connection per request, for a server that closes one after a stream."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 4, force_close=fresh_connections),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def load_run(url: str, body: dict, clients: int, requests_per_client: int, distinct: bool = False,
                   seed: int | None = None, fresh_connections: bool = False) -> dict:
    """`clients` concurrent clients, each sending requests back to back. `distinct`: every prompt
    starts with its own random letters (from `seed`), so no request can reuse another's prompt
    (prefix) cache; a run that repeats a load gives it a new seed."""
    results: list[RequestResult] = []
    errors: list[str] = []  # a request a server failed is counted, not fatal to the whole benchmark
    rng = random.Random(clients if seed is None else seed)

    async def client_loop(session: aiohttp.ClientSession) -> None:
        for _ in range(requests_per_client):
            sent = {**body, "prompt": "".join(rng.choices(string.ascii_letters, k=6)) + " " + body["prompt"]} \
                if distinct else body
            try:
                results.append(await stream_completion(session, url, sent))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors.append(type(e).__name__)

    async with load_session(clients, fresh_connections) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttfts = sorted(r.ttft for r in results)
    tokens = sum(r.tokens for r in results)
    if not results:
        raise RuntimeError(f"every request to {url} failed: {errors[:3]}")
    return {"clients": clients, "requests": len(results), "errors": len(errors), "tokens": tokens,
            "wall_s": round(wall, 3),
            "aggregate_tok_s": round(tokens / wall, 2),
            "single_stream_tok_s": round(statistics.median(r.tokens / r.total for r in results), 2),
            "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p99_s": round(percentile(ttfts, 99), 4)}


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)
