"""A bounded load on loopback and a graceful SIGTERM, against real server processes."""

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server

CAPACITY, QUEUE = 2, 4


@pytest.fixture(scope="module")
def small_server():
    proc, base = start_server("--max-batch-size", str(CAPACITY), "--max-queue", str(QUEUE))
    yield proc, base
    stop_server(proc)


async def test_beyond_capacity_and_queue_requests_get_429_at_once(small_server):
    _, base = small_server
    sent = CAPACITY + QUEUE + 20
    finished_ok: list[float] = []
    rejected_at: list[float] = []

    async def one(client, i):
        r = await client.post(f"{base}/generate", json={"prompt": "The cat", "max_tokens": 64, "ignore_eos": True})
        now = time.monotonic()
        if r.status_code == 200:
            finished_ok.append(now)
        else:
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_exceeded"
            rejected_at.append(now)
        return r.status_code

    limits = httpx.Limits(max_connections=sent + 5)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        statuses = await asyncio.gather(*(one(client, i) for i in range(sent)))
        health = await client.get(f"{base}/health")
    assert len(statuses) == sent  # no connection reset: every request got an answer
    assert statuses.count(200) + statuses.count(429) == sent
    assert statuses.count(200) >= CAPACITY + QUEUE and statuses.count(429) >= 1
    assert max(rejected_at) < min(finished_ok)  # refusals come before any accepted request finishes
    assert health.status_code == 200


def test_sigterm_drains_streams_then_exits_zero():
    proc, base = start_server("--drain-timeout-s", "60")
    lines: list[str] = []
    first_chunk = threading.Event()

    def stream():
        with httpx.stream("POST", f"{base}/generate", json={"prompt": "The cat", "stream": True, "max_tokens": 200,
                                                                 "ignore_eos": True},
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # the listener is closed: new requests are refused
            httpx.post(f"{base}/generate", json={"prompt": "1+1="}, timeout=5)
        reader.join(120)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_server(proc)
    assert lines[-1] == "[DONE]"
    final = json.loads(lines[-2])
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 200


def in_flight(base: str) -> int:
    return sum(v["in_flight"] for v in httpx.get(f"{base}/memory", timeout=10).json()["variants"])


def served(base: str) -> int:
    """Requests that ran to their end (a cancelled one never counts)."""
    return sum(v["requests_served"] for v in httpx.get(f"{base}/memory", timeout=10).json()["variants"])


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot_within_a_second(small_server, stream):
    _, base = small_server
    body = {"prompt": "The cat", "max_tokens": 240, "ignore_eos": True, "stream": stream}
    before = served(base)
    with httpx.Client(timeout=60) as client:
        if stream:
            with client.stream("POST", f"{base}/generate", json=body) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                assert in_flight(base) == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(f"{base}/generate", json=body, timeout=0.3)
    deadline = time.monotonic() + 1.0
    while in_flight(base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(base) == 0
    assert served(base) == before  # cancelled, not run to the end


def test_a_queued_request_whose_client_left_never_runs(small_server):
    _, base = small_server
    long = {"prompt": "The cat", "max_tokens": 200, "ignore_eos": True, "stream": True}
    before = served(base)
    results, running = [], threading.Semaphore(0)

    def runner():
        with httpx.stream("POST", f"{base}/generate", json=long, timeout=60) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            next(events)
            running.release()  # generating: it holds a slot
            results.append((r.status_code, list(events)[-1]))

    runners = [threading.Thread(target=runner) for _ in range(CAPACITY)]
    for t in runners:
        t.start()
    for _ in range(CAPACITY):  # both slots are taken once each stream has sent text
        assert running.acquire(timeout=60)
    with pytest.raises(httpx.ReadTimeout):  # this one waits in the queue, then its client leaves
        httpx.post(f"{base}/generate", json={**long, "max_tokens": 5, "stream": False}, timeout=0.05)
    for t in runners:
        t.join(60)
    assert results == [(200, "data: [DONE]")] * CAPACITY
    time.sleep(0.3)
    assert served(base) == before + CAPACITY and in_flight(base) == 0
