"""A real `dtype-serve` process on a free port, driven over TCP with httpx."""

import signal

import httpx
import pytest

from tests.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def server():
    proc, base = start_server(env={"DTYPE_SERVE_DTYPE": "float32"})
    yield proc, base
    stop_server(proc)


def test_serves_the_startup_dtype_from_the_environment(server):
    _, base = server
    r = httpx.post(f"{base}/generate", json={"prompt": "17+25=", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["dtype"] == "float32" and r.json()["text"] == "42"
    r = httpx.post(f"{base}/generate", json={"prompt": "17+25=", "dtype": "bf16", "max_tokens": 8}, timeout=60)
    assert r.json()["dtype"] == "bfloat16"


def test_streams_over_tcp(server):
    _, base = server
    with httpx.stream("POST", f"{base}/generate", json={"prompt": "The cat", "stream": True, "max_tokens": 16},
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3


def test_sigterm_exits_cleanly(server):
    proc, _ = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
