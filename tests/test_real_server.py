"""A real `dtype-serve` process on a free port, driven over TCP with httpx."""

import os
import signal
import sys

import httpx
import pytest

from tests.conftest import start_server, stop_server
from tests.test_allocator import build_marker_library

ON_LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def marker_library(tmp_path_factory):
    return build_marker_library(tmp_path_factory.mktemp("allocator")) if ON_LINUX else None


@pytest.fixture(scope="module")
def server(marker_library):
    # on Linux it preloads a library as it would a thread-caching allocator (executing itself again)
    proc, base = start_server(*(["--allocator", marker_library] if ON_LINUX else []),
                              env={"DTYPE_SERVE_DTYPE": "float32"})
    yield proc, base
    stop_server(proc)


@pytest.mark.skipif(not ON_LINUX, reason="LD_PRELOAD: Linux")
def test_the_process_runs_on_the_allocator_it_was_given(server, marker_library):
    proc, base = server
    assert marker_library in open(f"/proc/{proc.pid}/maps").read()  # the same process, executed again
    allocator = httpx.get(f"{base}/memory", timeout=30).json()["device"]["allocator"]
    assert allocator == {"library": os.path.basename(marker_library), "choice": os.path.basename(marker_library),
                         "note": ""}


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
