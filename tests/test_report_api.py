"""The dtype report through HTTP and the CLI: a job polled to completion, cached, charted."""

import asyncio
import json
import subprocess
import sys

from tests.conftest import ROOT


async def poll(client, method, url, **kwargs):
    for _ in range(600):
        r = await client.request(method, url, **kwargs)
        if r.status_code != 202:
            return r
        assert r.headers["retry-after"] == "1" and 0 <= r.json()["progress"] <= 1
        # requests keep being served while the report runs
        ok = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["text"] == "42"
        await asyncio.sleep(0.05)
    raise AssertionError("the report did not finish")


async def test_report_runs_as_a_job_and_is_cached(client):
    r = await poll(client, "GET", "/v1/dtypes/report", params={"dtypes": ["bfloat16", "float16"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "done"
    result = body["result"]
    assert set(result["dtypes"]) == {"float32", "bfloat16", "float16"}
    f32 = result["dtypes"]["float32"]
    assert f32["top1_agreement"] == 1.0 and f32["kl_max"] == 0 and f32["task_accuracy"] >= 0.9
    for dtype in ("bfloat16", "float16"):
        entry = result["dtypes"][dtype]
        assert 0.9 <= entry["top1_agreement"] <= 1 and entry["kl_mean"] >= 0 and entry["nonfinite_share"] == 0
        assert entry["total_bytes"] * 2 == f32["total_bytes"]
    from tests.test_tenancy import absolute_paths

    assert absolute_paths(body) == []  # file names, not the host's paths
    again = await client.get("/v1/dtypes/report", params={"dtypes": ["float16", "bfloat16"]})
    assert again.status_code == 200 and again.json()["result"] == result  # cached: same dtypes, any order

    chart = await client.get("/v1/dtypes/report/chart", params={"dtypes": ["bfloat16", "float16"], "format": "svg"})
    assert chart.status_code == 200 and chart.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in chart.content[:500]


async def test_report_over_user_prompts(client):
    r = await poll(client, "POST", "/v1/dtypes/report", json={"dtypes": ["bf16"], "prompts": ["The cat", "9+9="]})
    assert r.status_code == 200
    assert r.json()["result"]["probe_prompts"] == 2


async def test_report_input_errors(client):
    r = await client.post("/v1/dtypes/report", json={"prompts": ["x" * 3000]})
    assert r.status_code == 422
    r = await client.get("/v1/dtypes/report", params={"model": "../etc"})
    assert r.status_code == 404
    r = await client.get("/v1/dtypes/report", params={"dtypes": "float8"})
    assert r.status_code == 422


def test_compare_on_the_command_line(tmp_path):
    out = tmp_path / "report.json"
    chart = tmp_path / "chart.png"
    subprocess.run([sys.executable, "-m", "server", "compare", "--dtypes", "bfloat16", "--out", str(out),
                    "--chart", str(chart), "--task-prompts", "20"], cwd=ROOT, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["dtypes"]) == {"float32", "bfloat16"}
    assert chart.read_bytes()[:4] == b"\x89PNG"
