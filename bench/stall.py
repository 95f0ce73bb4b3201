"""One client cannot stall the others: the largest gap between two tokens of a running stream while
another client, side by side, loads a 400 MB model, asks for a model whose config declares 100,000
layers, sends 1 MB prompts, or runs a dtype report over new prompts.

    python -m bench.stall [--seconds 20] [--name cpu-stall] [--root DIR]

A probe process streams `/generate` requests of the bundled model one after another (every token its own
event: --stream-interval-s 0) and records the gaps between events of each stream; the disturbance runs in
the main process. `--root` serves another checkout's code (e.g. the code before the change) for an A/B.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import httpx

from bench.common import MODELS, ROOT, ensure_model, free_port, percentile, server, write_result
from models.weights.catalog import default_model_ref

TARGET_GAP_S = 0.25  # the figure to reach


def stream_probe(base: str, seconds: float, out) -> None:
    """Stream one request after another for `seconds`; send back each stream's gaps between events and
    its time to first event."""
    streams = []
    deadline = time.monotonic() + seconds
    body = {"prompt": "17+25=", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=600) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            stamps = []
            with client.stream("POST", f"{base}/generate", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        stamps.append(time.perf_counter())
            if stamps:
                streams.append({"first_s": stamps[0] - start,
                                "gaps_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)]})
    out.send(streams)


async def load_big_model(client: httpx.AsyncClient, deadline: float, big: str) -> dict:
    """Load and unload a 400 MB float32 variant, again and again."""
    loads = []
    while time.monotonic() < deadline:
        start = time.perf_counter()
        r = await client.post("/models/load", json={"model": big, "dtype": "float32"})
        loads.append({"status": r.status_code, "seconds": time.perf_counter() - start})
        await client.delete(f"/models/{big}/float32")
    return {"loads": loads}


async def many_layers(client: httpx.AsyncClient, deadline: float, _: str) -> dict:
    """Ask again and again for a model whose config declares 100,000 layers."""
    answers = []
    while time.monotonic() < deadline:
        start = time.perf_counter()
        r = await client.post("/generate", json={"prompt": "1+1=", "model": "many-layers"})
        answers.append({"status": r.status_code, "seconds": time.perf_counter() - start})
    return {"requests": answers}


async def big_prompts(client: httpx.AsyncClient, deadline: float, _: str) -> dict:
    """16 requests at a time with 1 MB prompts (all refused for length), again and again."""
    body = json.dumps({"prompt": "7" * 1_000_000, "max_tokens": 4})
    statuses: dict[int, int] = {}
    while time.monotonic() < deadline:
        rs = await asyncio.gather(*(client.post("/generate", content=body,
                                                headers={"content-type": "application/json"})
                                    for _ in range(16)))
        for r in rs:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    return {"statuses": statuses}


async def report(client: httpx.AsyncClient, deadline: float, _: str) -> dict:
    """Reports over new prompts (never cached), one after another, polled until done."""
    runs = []
    n = 0
    while time.monotonic() < deadline:
        n += 1
        body = {"dtypes": ["bfloat16"], "prompts": [f"Report {n} at {time.time()}: 17+25="]}
        start = time.perf_counter()
        while time.monotonic() < deadline + 60:
            r = await client.post("/v1/dtypes/report", json=body)
            if r.status_code != 202:
                break
            await asyncio.sleep(0.1)
        runs.append({"status": r.status_code, "state": r.json().get("state"), "seconds": time.perf_counter() - start})
    return {"reports": runs}


DISTURBANCES = {"none": None, "load_400mb": load_big_model, "many_layers": many_layers,
                "prompts_1mb": big_prompts, "report": report}


def prepare_models(folder: Path) -> str:
    """The model folder served beside the bundled model: a 400 MB float32 llama and a 100,000-layer config."""
    big = ensure_model("llama-100m", "float32")
    folder.mkdir(parents=True, exist_ok=True)
    served = folder / big.name  # hard links: the catalog takes no symlinked folders
    served.mkdir(exist_ok=True)
    for file in big.iterdir():
        if not (served / file.name).exists():
            os.link(file, served / file.name)
    layers = folder / "many-layers"
    if not layers.exists():
        shutil.copytree(default_model_ref(), layers)
        config = json.loads((layers / "config.json").read_text())
        (layers / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100_000}))
    return big.name


async def disturb(base: str, name: str, seconds: float, big: str) -> dict:
    run = DISTURBANCES[name]
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        if run is None:
            await asyncio.sleep(seconds)
            return {}
        return await run(client, time.monotonic() + seconds, big)


def summarize(streams: list[dict]) -> dict:
    gaps = sorted(g for s in streams for g in s["gaps_s"])
    firsts = sorted(s["first_s"] for s in streams)
    return {"streams": len(streams), "tokens": len(gaps) + len(streams),
            "max_gap_s": round(gaps[-1], 4) if gaps else None,
            "p99_gap_s": round(percentile(gaps, 99), 4) if gaps else None,
            "p50_gap_s": round(percentile(gaps, 50), 4) if gaps else None,
            "max_first_event_s": round(firsts[-1], 4) if firsts else None,
            "under_target": bool(gaps) and gaps[-1] < TARGET_GAP_S}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="per disturbance")
    p.add_argument("--only", nargs="+", choices=sorted(DISTURBANCES), help="run these disturbances only")
    p.add_argument("--name", default="cpu-stall", help="results file: bench/results/NAME.json")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server is measured")
    args = p.parse_args()
    big = prepare_models(MODELS / "stall")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning",
           "--model-dirs", str(MODELS / "stall"), "--stream-interval-s", "0"]
    if (args.root / "server" / "settings.py").read_text().count("report_starts_per_hour"):
        cmd += ["--report-starts-per-hour", "1000"]
    results = {}
    with server(cmd, f"{base}/health/ready", cwd=args.root):
        for name in args.only or list(DISTURBANCES):
            receive, send = multiprocessing.Pipe(duplex=False)
            probe = multiprocessing.Process(target=stream_probe, args=(base, args.seconds, send))
            probe.start()
            detail = asyncio.run(disturb(base, name, args.seconds, big))
            streams = receive.recv()
            probe.join()
            results[name] = {**summarize(streams), "disturbance": detail}
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "disturbance"}), flush=True)
    path = write_result(args.name, {"seconds": args.seconds, "root": str(args.root), "target_gap_s": TARGET_GAP_S,
                                    "results": results})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
