"""Saturation on loopback: /health latency while the server is full, accepted + rejected = sent,
and resident memory before and after (flat after warm-up).

    python -m bench.reliability [--seconds 20] [--clients 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time

import httpx

from bench.common import ROOT, free_port, percentile, rss_bytes, server, write_result


def probe_health(base: str, seconds: float, out) -> None:
    """GET /health every 20 ms from its own process, so the load clients' event loop does not delay
    the probe: the latency measured is the server's."""
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            r = client.get(f"{base}/health")
            latencies.append((time.perf_counter() - start) * 1000 if r.status_code == 200 else float("inf"))
            time.sleep(0.02)
    out.send(latencies)


async def saturate(base: str, clients: int, seconds: float) -> dict:
    counts = {"sent": 0, "ok": 0, "rejected": 0, "errors": 0}
    deadline = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            counts["sent"] += 1
            try:
                r = await client.post(f"{base}/generate", json={"prompt": "The cat", "max_tokens": 32,
                                                                 "ignore_eos": True})
                counts["ok" if r.status_code == 200 else "rejected" if r.status_code == 429 else "errors"] += 1
                if r.status_code == 429:
                    await asyncio.sleep(0.05)
            except httpx.TransportError:
                counts["errors"] += 1

    receive, send = multiprocessing.Pipe(duplex=False)
    prober = multiprocessing.Process(target=probe_health, args=(base, seconds, send))
    prober.start()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients + 10)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    health_ms = sorted(receive.recv())
    prober.join()
    return {**counts, "health_p50_ms": round(percentile(health_ms, 50), 2),
            "health_p99_ms": round(percentile(health_ms, 99), 2), "health_max_ms": round(health_ms[-1], 2),
            "health_samples": len(health_ms)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--capacity", type=int, default=8)
    p.add_argument("--queue", type=int, default=8)
    a = p.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--max-batch-size", str(a.capacity),
           "--max-queue", str(a.queue), "--log-level", "warning"]
    with server(cmd, f"{base}/health/ready") as proc:
        warm = asyncio.run(saturate(base, a.clients, a.seconds / 4))
        rss_warm = rss_bytes(proc.pid)
        run = asyncio.run(saturate(base, a.clients, a.seconds))
        rss_end = rss_bytes(proc.pid)
    result = {"clients": a.clients, "capacity": a.capacity, "queue": a.queue, "seconds": a.seconds,
              "warmup": warm, "run": run, "accounted": run["ok"] + run["rejected"] + run["errors"] == run["sent"],
              "rss_after_warmup_bytes": rss_warm, "rss_end_bytes": rss_end,
              "rss_growth_ratio": round(rss_end / rss_warm, 4)}
    path = write_result("reliability", result)
    print(json.dumps(result, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
