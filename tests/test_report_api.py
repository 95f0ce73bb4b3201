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


QUANT_PROMPTS = ["17+25=", "The small cat sees the", "Once upon a time, there was a"]


async def test_models_lists_quantized_report_dtypes(client):
    measured = (await client.get("/models")).json()["report_dtypes"]
    assert measured[:3] == ["float32", "bfloat16", "float16"]
    assert {"q8", "q4"} <= set(measured)  # MLX runs both on every backend
    r = await client.get("/v1/dtypes/report", params={"dtypes": "fit"})
    assert r.status_code == 422  # the report measures named precisions


async def test_quantized_report_decodes_as_served_requests_and_counts_their_bytes(client):
    r = await poll(client, "POST", "/v1/dtypes/report", json={"dtypes": ["q8", "q4"], "prompts": QUANT_PROMPTS})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert list(result["dtypes"]) == ["float32", "q4", "q8"]  # the engine keys reports by sorted precisions
    f32, q8, q4 = (result["dtypes"][d] for d in ("float32", "q8", "q4"))
    # the report's greedy continuations are a served greedy request's tokens at that precision
    for dtype in ("float32", "q8", "q4"):
        for prompt, entry in zip(QUANT_PROMPTS, result["dtypes"][dtype]["per_prompt"], strict=True):
            served = (await client.post("/generate", json={"prompt": prompt, "dtype": dtype, "temperature": 0,
                                                           "max_tokens": result["greedy_tokens"]})).json()
            n = served["usage"]["completion_tokens"]
            tokens = entry["greedy_tokens"]
            assert len(tokens) == n  # both count the end-of-sequence token, which has no text
            text_tokens = tokens[:-1] if served["finish_reason"] == "stop" else tokens
            text = (await client.post("/detokenize", json={"tokens": text_tokens})).json()["prompt"]
            assert text == served["text"], (dtype, prompt)
    # bytes and bits per weight are those of the served variants (/memory), resident now
    memory = {v["dtype"]: v for v in (await client.get("/memory")).json()["variants"]}
    for dtype, entry in (("q8", q8), ("q4", q4)):
        assert entry["total_bytes"] == memory[dtype]["total_bytes"]
        assert entry["bytes_by_dtype"] == memory[dtype]["bytes_by_dtype"]
        assert entry["bits_per_weight"] == memory[dtype]["bits_per_weight"]
        assert entry["quantization"]["mode"] == "affine" and entry["float_dtype"] == "bfloat16"
    assert f32["bits_per_weight"] == 32 and 8 < q8["bits_per_weight"] < 9 and 4 < q4["bits_per_weight"] < 5
    assert q4["total_bytes"] < q8["total_bytes"] < f32["total_bytes"] * 0.3
    # fidelity: fewer bits, further from float32 (KL); both still mostly agree
    assert 0 < q8["kl_mean"] < q4["kl_mean"] and 0.8 < q4["top1_agreement"] <= q8["top1_agreement"] <= 1
    for entry in (f32, q8, q4):
        assert entry["decode_tok_s"] > 0 and entry["decode_batch_tok_s"] > 0 and entry["prefill_tok_s"] > 0
        assert entry["nonfinite_share"] == 0 and entry["task_accuracy"] >= 0.9
    assert result["speed"]["batch"] == 8


def test_report_cli_module_measures_a_quantization(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("17+25=\nThe small cat sees the\n")
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "models.report.cli", "--dtypes", "q4", "--prompts", str(prompts),
                          "--no-bundled-prompts", "--task-prompts", "0", "--greedy-tokens", "8", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert list(result["dtypes"]) == ["float32", "q4"] and result["probe_prompts"] == 2
    q4 = result["dtypes"]["q4"]
    assert q4["quantization"] == {"mode": "affine", "bits": 4, "group_size": 64} and q4["kl_mean"] > 0
    assert q4["task_accuracy"] is None and result["task"] is None


def test_report_cli_refuses_bad_precisions(tmp_path):
    # each start imports MLX (~2.5 s): one refusal of each kind; `fit` alone is refused by the HTTP tests
    cases = [("models.report.cli", "fit+kv8", "named precisions"),
             ("models.report.fidelity", "q9", "unknown dtype")]  # the old entry point still works
    for module, dtype, message in cases:
        run = subprocess.run([sys.executable, "-m", module, "--dtypes", dtype], cwd=ROOT,
                             capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr



def test_report_cli_measures_a_kv_cache_precision(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("17+25=\nThe small cat sees the\n")
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "models.report.cli", "--dtypes", "float32+kv4", "--prompts",
                          str(prompts), "--no-bundled-prompts", "--task-prompts", "0", "--greedy-tokens", "8",
                          "--kv-contexts", "64", "1024", "--kv-positions", "16", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert list(result["dtypes"]) == ["float32", "float32+kv4"]
    entry, f32 = result["dtypes"]["float32+kv4"], result["dtypes"]["float32"]
    kv = entry["kv_cache"]
    # the bundled model's context is 256: 1024 is scored at the longest it has, 256 - 16
    assert kv["dtype"] == "kv4" and [c["context"] for c in kv["contexts"]] == [64, 240]
    assert kv["beyond_model_context"] == [1024] and all(c["positions"] == 16 for c in kv["contexts"])
    assert kv["bytes_per_token"] * 4 < f32["kv_cache"]["bytes_per_token"] and kv["decode_tok_s_ratio"] > 0
    assert entry["total_bytes"] == f32["total_bytes"] and entry["kl_mean"] > 0  # float32's weights, a 4-bit cache


async def test_report_over_http_measures_a_kv_cache_precision_at_the_contexts_asked(client):
    body = {"dtypes": ["float32+kv4"], "prompts": ["17+25=", "The small cat sees the"], "kv_contexts": [64, 16, 1024]}
    r = await poll(client, "POST", "/v1/dtypes/report", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert list(result["dtypes"]) == ["float32", "float32+kv4"]
    f32, entry = result["dtypes"]["float32"], result["dtypes"]["float32+kv4"]
    assert f32["kv_cache"]["bits"] is None and f32["kv_cache"]["contexts"] == []
    kv = entry["kv_cache"]
    assert kv["dtype"] == "kv4" and kv["bits"] == 4 and kv["reference"] == "float32"
    assert kv["float_bytes_per_token"] == f32["kv_cache"]["bytes_per_token"]
    assert kv["bytes_per_token"] * 3 < kv["float_bytes_per_token"]
    assert kv["bytes_ratio"] == round(kv["bytes_per_token"] / kv["float_bytes_per_token"], 4)
    # the bundled model's context is 256: 1024 is scored at the longest it has, 256 - 32 positions
    assert [c["context"] for c in kv["contexts"]] == [16, 64, 224] and kv["beyond_model_context"] == [1024]
    for c in kv["contexts"]:
        assert c["positions"] == kv["positions"] == 32
        assert 0 <= c["top1_agreement"] <= 1 and 0 <= c["kl_mean"] <= c["kl_max"]
    assert entry["total_bytes"] == f32["total_bytes"] and entry["kl_mean"] > 0  # float32's weights, a 4-bit cache
    # the same contexts in any order are the same report
    again = await client.post("/v1/dtypes/report", json={**body, "kv_contexts": [1024, 64, 16, 16]})
    assert again.status_code == 200 and again.json()["result"] == result


async def test_report_kv_input_errors(client):
    for bad in ([0], [4097], [16, 32, 64, 128, 256], [], ["64"], [True], [1.5], "64"):
        r = await client.post("/v1/dtypes/report", json={"dtypes": ["q4+kv8"], "kv_contexts": bad})
        assert r.status_code == 422 and "kv_contexts" in r.text and "Traceback" not in r.text, (bad, r.text)
    for dtype in ("fit+kv8", "fit", "q4+kv3", "float32+fit"):
        r = await client.post("/v1/dtypes/report", json={"dtypes": [dtype]})
        assert r.status_code == 422, (dtype, r.text)
    r = await client.get("/v1/dtypes/report", params={"dtypes": "q4+kv8", "kv_contexts": ["64", "5000"]})
    assert r.status_code == 422 and "kv_contexts" in r.text


def test_the_http_bound_on_kv_contexts_is_the_reports_longest_default():
    from models.report.fidelity import DEFAULT_KV_CONTEXTS
    from server.routes.report import MAX_KV_CONTEXT

    assert MAX_KV_CONTEXT == max(DEFAULT_KV_CONTEXTS)


def test_a_long_kv_context_is_prefilled_one_chunk_per_worker_step(tmp_path):
    """The report's KV context runs yield after each prefill chunk, and give the logits of one whole prefill."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from models.decode.prefill import CHUNK, prefill
    from models.mlx_lm_ext.quantized_batch_cache import quantize_layers
    from models.report import runs
    from models.testing.synthetic import llama_config, make_llama_checkpoint

    folder = make_llama_checkpoint(tmp_path / "llama", llama_config(hidden=64, layers=2, vocab=100, context=4096))
    model, _ = load(str(folder))
    context, ids = CHUNK + 52, [(7 * i) % 100 for i in range(CHUNK + 60)]
    for kv in (None, (32, 4)):
        run, parts = runs.context_logits(model, ids, context, kv), 0
        try:
            while True:
                assert next(run) is runs.PART
                parts += 1
        except StopIteration as done:
            out = done.value
        cache = make_prompt_cache(model)  # the whole context in one call: the same chunks
        prefill(model, mx.array(ids[:context]), cache, False, None if kv is None else
                lambda layers, kv=kv: quantize_layers(layers, *kv))
        whole = model(mx.array(ids[context:])[None], cache=cache)[0].astype(mx.float32)
        assert parts == 2 and out.shape == (8, 100) and mx.array_equal(out, whole).item(), kv


async def test_a_kv_report_counts_its_caches_before_it_starts():
    # room for the plain report (its float32 copy and one variant) beside the resident float32 default, but not
    # for a KV precision's runs: the float and the quantized cache at the model's context
    from models.weights.checkpoint import read_config
    from models.weights.estimate import estimate_variant, kv_cache_bytes
    from tests.conftest import BUNDLED
    from tests.test_registry import app_client, close

    f32 = estimate_variant(BUNDLED, "float32")["total_bytes"]
    kv_runs = 2 * kv_cache_bytes(read_config(BUNDLED), "float32", 1, 256)  # the bundled model's context
    app, ctx, client = await app_client(dtype="float32", memory_budget=str(3 * f32 + kv_runs // 2),
                                        model_dirs=())
    try:
        r = await client.post("/v1/dtypes/report", json={"dtypes": ["float32+kv8"], "kv_contexts": [64]})
        assert r.status_code == 200 or r.status_code == 202, r.text  # 64 tokens of context: it fits
        r = await client.post("/v1/dtypes/report", json={"dtypes": ["bfloat16+kv8"], "kv_contexts": [4096]})
        error = r.json()["error"]
        assert r.status_code == 507 and error["type"] == "memory_budget_exceeded", r.text
        assert error["required_bytes"] == 2 * f32 + kv_runs
        assert (await client.get("/health/ready")).status_code == 200
    finally:
        await close(ctx, client)
