"""Observability with a real server: the JSON request log line, aborted streams in /metrics, the Grafana
dashboard's queries, and the start-up progress bar."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.load_progress import LoadProgressBar
from server.log_format import JsonLinesFormatter
from tests.conftest import ROOT, start_server, stop_server

SECRET = "zq-private-words"  # a prompt text that must never reach a log line unless asked


@pytest.fixture(scope="module")
def json_log_server():
    proc, base = start_server("--log-format", "json", "--log-level", "info")
    yield proc, base
    stop_server(proc)


def _metric_values(base: str) -> dict:
    text = httpx.get(f"{base}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_json_request_line_has_its_fields_and_no_prompt_text(json_log_server):
    proc, base = json_log_server
    r = httpx.post(f"{base}/generate", json={"prompt": f"{SECRET} 17+25=", "max_tokens": 4, "ignore_eos": True},
                   headers={"X-Request-Id": "obs-test-1"}, timeout=60)
    assert r.status_code == 200
    chat = httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"X-Request-Id": "obs-test-2"},
                      json={"messages": [{"role": "user", "content": SECRET}], "max_tokens": 3})
    assert chat.status_code == 200
    refused = httpx.post(f"{base}/generate", json={"prompt": SECRET, "model": "no-such-model"},
                         headers={"X-Request-Id": "obs-test-3"}, timeout=60)
    assert refused.status_code == 404
    stop_server(proc)  # its output up to now is in the pipe
    output = proc.stdout.read()
    assert SECRET not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    by_id = {line["request_id"]: line for line in lines if line.get("logger") == "dtype_serve.requests"}
    done = by_id["obs-test-1"]
    usage, timings = r.json()["usage"], r.json()["timings"]
    assert done["path"] == "/generate" and (done["model"], done["dtype"]) == ("tiny-arith", "bfloat16")
    assert done["status"] == 200 and done["finish_reason"] == "length"
    assert (done["prompt_tokens"], done["completion_tokens"]) == (usage["prompt_tokens"], 4)
    assert done["time_to_first_token_s"] == timings["time_to_first_token_s"]
    assert done["total_s"] == timings["total_s"]
    assert 0 <= done["queue_s"] <= done["time_to_first_token_s"] <= done["total_s"] <= done["duration_s"]
    assert by_id["obs-test-2"]["path"] == "/v1/chat/completions" and by_id["obs-test-2"]["completion_tokens"] == 3
    error = by_id["obs-test-3"]
    assert error["status"] == 404 and error["error"] == "model_not_found" and "finish_reason" not in error
    assert "prompt" not in done


def _left_stream(base: str) -> None:
    """Start a long stream and leave after its first text."""
    with httpx.stream("POST", f"{base}/generate", timeout=60, json={
            "prompt": "1+1=", "max_tokens": 240, "ignore_eos": True, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                break


def test_a_stream_the_client_leaves_counts_as_an_abort():
    proc, base = start_server()
    try:
        variant = (("dtype", "bfloat16"), ("model", "tiny-arith"))

        def ended(values: dict, reason: str) -> float:
            return values.get(("dtype_serve_request_success_total",
                               tuple(sorted((*variant, ("finished_reason", reason))))), 0)

        # a fast machine may finish a stream before it sees the client leave: then it counts as `length`
        for streams in range(1, 6):
            _left_stream(base)
            for _ in range(600):  # the server records it when it sees the closed connection
                values = _metric_values(base)
                if ended(values, "abort") + ended(values, "length") == streams:
                    break
                httpx.get(f"{base}/health")
            assert ended(values, "abort") + ended(values, "length") == streams
            if ended(values, "abort"):
                break
        assert ended(values, "abort") >= 1
        running = {k: v for k, v in values.items() if k[0] == "dtype_serve_num_requests_running"}
        assert set(running.values()) == {0}
    finally:
        stop_server(proc)


def _dashboard_metric_names(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    return {name for e in exprs for name in re.findall(r"\bdtype_serve_[a-z0-9_]+", e)}


async def test_every_metric_the_dashboard_queries_is_exposed_after_a_request(client):
    dashboard = json.loads(Path(ROOT, "docs", "grafana-dashboard.json").read_text())
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200
    failed = await client.post("/generate", json={"prompt": "x", "model": "no-such-model"})
    assert failed.status_code == 404  # the errors panel's counter appears with the first error
    exposed = {s.name for f in text_string_to_metric_families((await client.get("/metrics")).text)
               for s in f.samples}
    missing = _dashboard_metric_names(dashboard) - exposed
    assert not missing


async def test_log_prompts_puts_the_prompt_in_the_request_line(app, client, caplog, monkeypatch):
    caplog.set_level("INFO", logger="dtype_serve.requests")
    r = await client.post("/generate", json={"prompt": SECRET, "max_tokens": 2})
    assert r.status_code == 200
    monkeypatch.setattr(app.state.generation_observer, "log_prompts", True)
    r = await client.post("/generate", json={"prompt": SECRET, "max_tokens": 2})
    assert r.status_code == 200
    plain, asked = [r.fields for r in caplog.records if r.name == "dtype_serve.requests"][-2:]
    assert "prompt" not in plain and asked["prompt"] == SECRET
    line = json.loads(JsonLinesFormatter().format(caplog.records[-1]))
    assert line["prompt"] == SECRET and line["request_id"] == asked["request_id"]


def test_progress_bar_shows_tensors_and_bytes_of_each_load():
    stream = io.StringIO()
    bar = LoadProgressBar(stream)
    bar.update({"model": "tiny", "dtype": "q4", "tensors_done": 0, "tensors": 0, "bytes_done": 0, "bytes": 0})
    bar.update({"model": "tiny", "dtype": "q4", "tensors_done": 3, "tensors": 12, "bytes_done": 2048,
                "bytes": 8192})
    bar.update(None)
    text = stream.getvalue()
    assert "loading tiny/q4" in text and "3/12 tensors" in text and "25%" in text


async def test_models_and_metrics_show_a_load_in_progress(app, client):
    """Midway through a load (the worker thread inside its between-tensors hook), /models, /health and
    /metrics answer with the load's progress instead of waiting for it to end."""
    import asyncio

    engine = app.state.engine
    loop = asyncio.get_running_loop()
    hook, seen = engine.registry.between_tensors, {}

    def midway() -> None:
        loading = engine.registry.loading
        if not seen and loading["tensors"] and loading["tensors_done"] == loading["tensors"] // 2:
            for path in ("/models", "/health", "/metrics"):
                seen[path] = asyncio.run_coroutine_threadsafe(client.get(path), loop).result(timeout=30)
        hook()

    await client.delete("/models/tiny-arith/float32")
    engine.registry.between_tensors = midway
    try:
        r = await client.post("/models/load", json={"dtype": "float32"})
    finally:
        engine.registry.between_tensors = hook
    assert r.status_code == 200
    models, health = seen["/models"].json(), seen["/health"].json()
    loading = models["loading"]
    assert (loading["model"], loading["dtype"]) == ("tiny-arith", "float32")
    assert 0 < loading["tensors_done"] < loading["tensors"] and 0 < loading["bytes_done"] < loading["bytes"]
    assert loading["bytes"] == r.json()["total_bytes"]
    assert "float32" not in {v["dtype"] for v in models["resident"]}
    assert health["loading"]["tensors_done"] == loading["tensors_done"]
    gauges = {s.name: s.value for f in text_string_to_metric_families(seen["/metrics"].text) for s in f.samples
              if s.name.startswith("dtype_serve_loading_")}
    assert gauges["dtype_serve_loading_bytes"] == loading["bytes"]
    assert gauges["dtype_serve_loading_tensors_done"] == loading["tensors_done"]
    after = (await client.get("/models")).json()
    assert after["loading"] is None and "float32" in {v["dtype"] for v in after["resident"]}
    await client.delete("/models/tiny-arith/float32")
