"""`dtype-serve ps` and `dtype-serve models` against a real server behind an API key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, free_port, start_server, stop_server

KEY = "terminal-key"


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--api-key", KEY, "--memory-budget", "64MiB")
    httpx.post(base + "/models/load", json={"dtype": "float32"}, headers={"Authorization": f"Bearer {KEY}"},
               timeout=60).raise_for_status()
    yield base
    stop_server(proc)


def cli(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DTYPE_SERVE_API_KEY", "DTYPE_SERVE_URL")}
    if key:
        env["DTYPE_SERVE_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_ps_lists_the_resident_variants(server):
    out = cli("ps", "--url", server)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "DTYPE", "SIZE"]
    rows = {tuple(line.split()[:3]) for line in lines[1:-1]}
    assert rows == {("tiny-arith", "bfloat16", "2.03"), ("tiny-arith", "float32", "4.05")}
    assert "(pinned)" in next(line for line in lines if " bfloat16 " in line)
    assert lines[-1].startswith("budget: ") and "of 64.00 MiB" in lines[-1]


def test_models_lists_each_dtype_with_its_estimate(server):
    out = cli("models", "--url", server)
    assert out.returncode == 0, out.stderr
    dtypes = httpx.get(server + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()["dtypes"]
    lines = out.stdout.splitlines()
    body = lines[1:next(i for i, line in enumerate(lines) if line.startswith("default: "))]
    listed = {(line.split()[1] if line.startswith("tiny-arith") else line.split()[0]): line.endswith("yes")
              for line in body}
    estimates = httpx.get(server + "/memory/estimate?include_quantized=true",
                          headers={"Authorization": f"Bearer {KEY}"}).json()["estimates"]
    assert set(listed) == {e["dtype"] for e in estimates}  # read from the API, whatever its names
    assert {d for d, resident in listed.items() if resident} == {"bfloat16", "float32"}
    assert "dtypes a request may name: " + ", ".join(dtypes) in out.stdout


def test_json_is_the_apis_own(server):
    out = cli("ps", "--url", server, "--json")
    assert {v["dtype"] for v in json.loads(out.stdout)["variants"]} == {"bfloat16", "float32"}


def test_errors_are_one_clear_line(server):
    out = cli("ps", "--url", server, key=None)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == f"dtype-serve: {server}/memory: 401 a valid API key is required (Authorization: " \
                                 "Bearer <key>)"
    out = cli("models", "--url", server, "--api-key", "wrong")
    assert out.returncode == 1 and "401" in out.stderr and "Traceback" not in out.stderr
    closed = f"http://127.0.0.1:{free_port()}"
    out = cli("ps", "--url", closed)
    assert out.returncode == 1 and out.stderr.startswith(f"dtype-serve: cannot reach {closed}")


def test_ps_shows_the_load_in_progress():
    from server.terminal import ps_view

    budget = {"used_bytes": 0, "budget_bytes": 1 << 30, "free_bytes": 1 << 30, "pinned": [],
              "loading": {"model": "big", "dtype": "q4", "tensors_done": 12, "tensors": 48,
                          "bytes_done": 1 << 20, "bytes": 4 << 20}}
    view = ps_view({"variants": [], "budget": budget}, 0.0)
    assert view.splitlines()[-1] == "loading big/q4: 25% (12 of 48 tensors, 1.00 MiB of 4.00 MiB)"
    budget["loading"] = None
    assert "loading" not in ps_view({"variants": [], "budget": budget}, 0.0)
