"""A real `dtype-serve` process on a free port, driven over TCP with httpx."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT, free_port


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "DTYPE_SERVE_PORT": str(port), "DTYPE_SERVE_DTYPE": "float32"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    ready = False
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ready = httpx.get(f"{base}/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            pass
        if ready:
            break
        time.sleep(0.2)
    if not ready:
        proc.kill()
        pytest.fail(f"server did not become ready: {proc.stdout.read()[-2000:]}")
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


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
    proc, base = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
