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


def _families(text: str) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted labels: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


VARIANT = (("dtype", "bfloat16"), ("model", "tiny-arith"))
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds")


async def test_request_histograms_grow_by_one_per_request_with_plausible_sums(client):
    import time

    before = _families((await client.get("/metrics")).text)
    sent = time.perf_counter()
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 6, "ignore_eos": True})
    wall = time.perf_counter() - sent
    assert r.status_code == 200
    after = _families((await client.get("/metrics")).text)

    def delta(sample: str, labels: tuple = VARIANT) -> float:
        return after[sample][labels] - before.get(sample, {}).get(labels, 0)

    sums = {}
    for name in HISTOGRAMS:
        assert delta(f"dtype_serve_{name}_count") == 1, name
        sums[name] = delta(f"dtype_serve_{name}_sum")
        assert 0 <= sums[name] <= wall, name
        inf = (*VARIANT, ("le", "+Inf"))
        assert delta(f"dtype_serve_{name}_bucket", tuple(sorted(inf))) == 1
    # the engine's own timings, as the response reports them
    timings = r.json()["timings"]
    assert abs(sums["e2e_request_latency_seconds"] - timings["total_s"]) < 1e-3
    assert abs(sums["time_to_first_token_seconds"] - timings["time_to_first_token_s"]) < 1e-3
    assert sums["request_queue_time_seconds"] <= sums["time_to_first_token_seconds"]
    gaps = (sums["e2e_request_latency_seconds"] - sums["time_to_first_token_seconds"]) / 5
    assert abs(sums["inter_token_latency_seconds"] - gaps) < 1e-6
    usage = r.json()["usage"]
    assert delta("dtype_serve_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("dtype_serve_generation_tokens_total") == usage["completion_tokens"] == 6
    assert delta("dtype_serve_request_success_total", tuple(sorted((*VARIANT, ("finished_reason", "length"))))) == 1
    assert after["dtype_serve_num_requests_running"][VARIANT] == 0
    assert set(after["dtype_serve_num_requests_waiting"].values()) == {0}
    assert after["dtype_serve_variant_load_seconds"][VARIANT] > 0
    assert after["dtype_serve_variant_total_bytes"][VARIANT] == sum(
        v for k, v in after["dtype_serve_variant_bytes"].items() if dict(k)["dtype"] == "bfloat16")


async def test_errors_counted_by_type(client):
    before = _families((await client.get("/metrics")).text)
    r = await client.post("/generate", json={"prompt": "x", "model": "no-such-model"})
    assert r.status_code == 404
    after = _families((await client.get("/metrics")).text)
    # a name no request was admitted under is counted as "other" (a client cannot mint label values)
    labels = (("dtype", "auto"), ("error_type", "model_not_found"), ("model", "other"))
    assert after["dtype_serve_request_errors_total"][labels] == before.get(
        "dtype_serve_request_errors_total", {}).get(labels, 0) + 1


async def test_queue_time_includes_the_load_a_request_waits_for(client):
    await client.delete("/models/tiny-arith/float16")  # not resident: the request below loads it
    before = _families((await client.get("/metrics")).text)
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 3, "dtype": "float16"})
    assert r.status_code == 200
    after = _families((await client.get("/metrics")).text)
    key = (("dtype", "float16"), ("model", "tiny-arith"))
    queued = after["dtype_serve_request_queue_time_seconds_sum"][key] - before.get(
        "dtype_serve_request_queue_time_seconds_sum", {}).get(key, 0)
    load_seconds = after["dtype_serve_variant_load_seconds"][key]  # rounded to 0.1 ms
    assert load_seconds > 0 and queued >= load_seconds - 1e-4
    assert queued <= r.json()["timings"]["time_to_first_token_s"]
    await client.delete("/models/tiny-arith/float16")
