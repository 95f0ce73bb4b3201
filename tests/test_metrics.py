"""GET /metrics in Prometheus text format, with the same exact bytes as /memory."""

from prometheus_client.parser import text_string_to_metric_families


async def test_metrics_match_memory_and_count_requests(client):
    def samples(text):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples((await client.get("/metrics")).text)
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
    assert r.status_code == 200
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)
    key = (("dtype", "bfloat16"), ("model", "tiny-arith"))
    assert after[("dtype_serve_variant_requests_total", key)] == before.get(
        ("dtype_serve_variant_requests_total", key), 0) + 1
    assert after[("dtype_serve_variant_generated_tokens_total", key)] >= before.get(
        ("dtype_serve_variant_generated_tokens_total", key), 0) + 2
    memory = (await client.get("/memory")).json()
    variant = next(v for v in memory["variants"] if v["dtype"] == "bfloat16")
    label = (("dtype", "bfloat16"), ("model", "tiny-arith"), ("param_dtype", "bfloat16"))
    assert after[("dtype_serve_variant_bytes", label)] == variant["bytes_by_dtype"]["bfloat16"]
    assert after[("dtype_serve_budget_bytes", ())] == memory["budget"]["budget_bytes"]


async def test_worker_time_by_phase_grows_with_decoding(client):
    def worker(text):
        return {s.labels.get("phase", s.name): s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name in ("dtype_serve_worker_seconds_total",
                                                      "dtype_serve_decode_steps_total")}

    before = worker((await client.get("/metrics")).text)
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200
    after = worker((await client.get("/metrics")).text)
    assert set(after) == {"idle", "admit", "decode", "emit", "flush", "report", "dtype_serve_decode_steps_total"}
    assert after["dtype_serve_decode_steps_total"] >= before["dtype_serve_decode_steps_total"] + 12
    assert after["decode"] > before["decode"] and after["emit"] > before["emit"]
    memory = (await client.get("/memory")).json()["worker"]
    assert memory["decode_steps"] >= after["dtype_serve_decode_steps_total"]
    assert memory["seconds"]["decode"] >= after["decode"]
