"""What observing a generation costs the event loop: a synthetic event stream consumed plainly and through
server/observe.py (request metrics and the request log line, its handler discarding), per request.

    python -m bench.observe_cost --requests 5000 --deltas 1 64 [--out bench/results/observe-cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from types import SimpleNamespace

from models.api import Finished, GenerationParams, Started, TextDelta, Usage
from server.observe import GenerationObserver, request_log
from server.serving_metrics import ServingMetrics


async def _events(deltas: int):
    yield Started("m", "bfloat16", 5)
    for _ in range(deltas):
        yield TextDelta("x")
    yield Finished("m", "bfloat16", "length", Usage(5, deltas), 0.01, 0.1, 100.0, queue_s=0.001)


async def _consume(events) -> None:
    async for _ in events:
        pass


async def _per_request_s(make, requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        await _consume(make())
    return (time.perf_counter() - started) / requests


async def run(requests: int, deltas: list[int]) -> list[dict]:
    request_log.handlers, request_log.propagate = [logging.NullHandler()], False  # formatted, not written
    request_log.setLevel(logging.INFO)
    observer = GenerationObserver(ServingMetrics(), "m", "bfloat16")
    request = SimpleNamespace(scope={"state": {"request_id": "r"}}, url=SimpleNamespace(path="/generate"))
    params = GenerationParams(prompt="p")
    rows = []
    for n in deltas:
        plain = await _per_request_s(lambda n=n: _events(n), requests)
        observed = await _per_request_s(lambda n=n: observer.observe(request, params, _events(n)), requests)
        rows.append({"deltas": n, "plain_us": round(plain * 1e6, 1), "observed_us": round(observed * 1e6, 1),
                     "overhead_us": round((observed - plain) * 1e6, 1)})
        print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--deltas", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = asyncio.run(run(args.requests, args.deltas))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"requests": args.requests, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
