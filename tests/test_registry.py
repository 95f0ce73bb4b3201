"""Variants under a memory budget: estimates, refusals, LRU eviction, single loads, unloading."""

import asyncio
import shutil
import sys

import httpx
import pytest

from server.app import create_app
from tests.conftest import make_settings

MiB = 1024 * 1024


async def app_client(**settings):
    """A started app (no start-up warm-up unless asked) and a client to it."""
    app = create_app(make_settings(**{"warmup": False, **settings}))
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    await app.state.start_task
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120)
    return app, ctx, client


async def close(ctx, client):
    await client.aclose()
    await ctx.__aexit__(None, None, None)


@pytest.fixture(scope="module")
async def roomy(model_dir):
    app, ctx, client = await app_client(model_dirs=(model_dir,))
    yield client
    await close(ctx, client)


@pytest.mark.parametrize("model", ["small-f32", "small-q4", "tiny-arith"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
async def test_estimate_matches_the_loaded_variant_within_1_percent(roomy, model, dtype):
    estimate = (await roomy.get("/memory/estimate", params={"model": model, "dtype": dtype})).json()["estimates"][0]
    loaded = (await roomy.post("/models/load", json={"model": model, "dtype": dtype})).json()
    assert abs(estimate["total_bytes"] - loaded["total_bytes"]) <= 0.01 * loaded["total_bytes"]
    assert set(estimate["bytes_by_dtype"]) == set(loaded["bytes_by_dtype"])
    if model == "small-q4":
        assert loaded["bytes_by_dtype"]["uint32"] == estimate["bytes_by_dtype"]["uint32"]


async def test_estimate_of_all_dtypes_without_loading(roomy):
    before = (await roomy.get("/memory")).json()["budget"]["loads"]
    r = await roomy.get("/memory/estimate", params={"model": "small-f32"})
    assert [e["dtype"] for e in r.json()["estimates"]] == ["float32", "float16", "bfloat16"]
    f32, f16, bf16 = (e["total_bytes"] for e in r.json()["estimates"])
    assert f16 == bf16 and abs(f32 - 2 * f16) < 0.01 * f32
    assert (await roomy.get("/memory")).json()["budget"]["loads"] == before


async def test_memory_report_is_exact_and_complete(roomy):
    await roomy.post("/models/load", json={"model": "small-q4", "dtype": "bfloat16"})
    memory = (await roomy.get("/memory")).json()
    for v in memory["variants"]:
        assert v["total_bytes"] == sum(v["bytes_by_dtype"].values())
        assert v["parameter_count"] > 0 and v["load_seconds"] >= 0 and v["load_peak_bytes"] > 0
    q = next(v for v in memory["variants"] if v["model"] == "small-q4" and v["dtype"] == "bfloat16")
    assert set(q["bytes_by_dtype"]) == {"bfloat16", "uint32"}
    used = memory["budget"]["used_bytes"]
    assert memory["process"]["active_bytes"] >= used * 0.99
    assert memory["device"]["backend"] in ("cpu", "metal", "cuda") and memory["device"]["total_memory_bytes"] > 0
    # variants cast from a resident one share what the cast leaves alone (the uint32 weights): counted once
    totals = [v["total_bytes"] for v in memory["variants"]]
    assert max(totals) <= used <= sum(totals)


async def test_budget_refusal_leaves_resident_variants_serving(model_dir):
    app, ctx, client = await app_client(model_dirs=(model_dir,), memory_budget=str(3 * MiB))
    try:
        r = await client.post("/generate", json={"prompt": "17+25=", "dtype": "float32", "max_tokens": 8})
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["dtype"] == "float32" and error["required_bytes"] > error["available_bytes"]
        r = await client.post("/models/load", json={"model": "small-f32", "dtype": "float32"})
        assert r.status_code == 507
        ok = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["text"] == "42"
        assert [v["dtype"] for v in (await client.get("/memory")).json()["variants"]] == ["bfloat16"]
    finally:
        await close(ctx, client)


async def test_least_recently_used_idle_variant_is_evicted_first(model_dir):
    # bf16 (pinned) 2.1 + f32 4.25 + f16 2.1 > 8; a request's KV buffers take a step of 256 positions (f32: 1 MiB)
    app, ctx, client = await app_client(memory_budget=str(8 * MiB))
    try:
        assert (await client.post("/generate", json={"prompt": "1+1=", "dtype": "float32"})).status_code == 200
        assert (await client.post("/generate", json={"prompt": "1+1=", "dtype": "float16"})).status_code == 200
        resident = {v["dtype"] for v in (await client.get("/memory")).json()["variants"]}
        assert resident == {"bfloat16", "float16"}  # float32 was the idle least recently used; bf16 is pinned
        budget = (await client.get("/memory")).json()["budget"]
        assert budget["used_bytes"] <= budget["budget_bytes"]
    finally:
        await close(ctx, client)


async def test_concurrent_first_requests_load_a_variant_once(roomy):
    bodies = [{"prompt": f"{i}+{i}=", "dtype": "float16", "model": "small-f32", "max_tokens": 4} for i in range(12)]
    responses = await asyncio.gather(*(roomy.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in responses)
    loads = (await roomy.get("/memory")).json()["budget"]["loads"]
    assert [x["count"] for x in loads if x["model"] == "small-f32" and x["dtype"] == "float16"] == [1]


async def test_a_second_dtype_is_derived_from_the_resident_checkpoint_dtype(roomy):
    await roomy.post("/models/load", json={"model": "small-f32", "dtype": "float32"})
    derived = (await roomy.post("/models/load", json={"model": "small-f32", "dtype": "bfloat16"})).json()
    assert derived["loaded_from"] == "float32"


async def test_unloading_frees_memory(roomy):
    loaded = (await roomy.post("/models/load", json={"model": "small-f32", "dtype": "float32"})).json()
    r = await roomy.delete("/models/small-f32/float32")
    assert r.status_code == 200
    assert r.json()["freed_bytes"] >= 0.95 * loaded["total_bytes"]
    resident = [(v["model"], v["dtype"]) for v in (await roomy.get("/memory")).json()["variants"]]
    assert ("small-f32", "float32") not in resident
    assert (await roomy.delete("/models/small-f32/float32")).status_code == 400


@pytest.mark.parametrize("name", ["../small-f32", "/etc/passwd", "http://example.com/m", "small-f32/../small-q4",
                                  "~/x", "..", ".", "small-f32%2F..", "C:\\\\models\\\\x"])
async def test_path_like_names_are_refused_without_opening_a_file(roomy, name):
    opened = []

    def audit(event, args):
        if event == "open":
            opened.append(args[0])

    sys.addaudithook(audit)  # hooks cannot be removed; the list is only read here
    start = len(opened)
    r = await roomy.post("/generate", json={"prompt": "1+1=", "model": name})
    r2 = await roomy.get("/memory/estimate", params={"model": name})
    r3 = await roomy.post("/models/load", json={"model": name})
    files = [str(p) for p in opened[start:] if not str(p).endswith((".py", ".pyc"))]
    assert {r.status_code, r2.status_code, r3.status_code} == {404}
    assert files == []


async def test_idle_variants_are_unloaded_after_the_idle_timeout():
    app, ctx, client = await app_client(idle_unload_s=0.3)
    try:
        assert (await client.post("/models/load", json={"dtype": "float32"})).status_code == 200
        for _ in range(60):
            resident = {v["dtype"] for v in (await client.get("/memory")).json()["variants"]}
            if resident == {"bfloat16"}:
                break
            await asyncio.sleep(0.1)
        assert resident == {"bfloat16"}  # float32 went idle and was unloaded; the default is pinned
    finally:
        await close(ctx, client)


async def test_a_variant_in_use_is_never_evicted(model_dir):
    # budget: the pinned default (2.1 MB) + float32 (4.25 MB) and its request's KV buffers (a step of 256
    # positions: 1 MiB) only; float16 would need float32 evicted
    app, ctx, client = await app_client(memory_budget=str(8 * MiB))
    try:
        long = client.post("/generate", json={"prompt": "The cat", "dtype": "float32", "max_tokens": 200,
                                              "ignore_eos": True})
        task = asyncio.create_task(long)
        for _ in range(100):
            variants = (await client.get("/memory")).json()["variants"]
            if any(v["dtype"] == "float32" and v["in_flight"] for v in variants):
                break
            await asyncio.sleep(0.02)
        r = await client.post("/generate", json={"prompt": "1+1=", "dtype": "float16", "max_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"  # it may fit once float32 is idle
        assert (await task).status_code == 200
        r = await client.post("/generate", json={"prompt": "1+1=", "dtype": "float16", "max_tokens": 4})
        assert r.status_code == 200
    finally:
        await close(ctx, client)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])  # the bundled model's own dtype, by both names
async def test_the_pinned_default_variant_cannot_be_unloaded(roomy, dtype):
    r = await roomy.delete(f"/models/tiny-arith/{dtype}")
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict", r.text
    assert "pinned" in r.json()["error"]["message"] and "retry-after" not in r.headers
    resident = [(v["model"], v["dtype"]) for v in (await roomy.get("/memory")).json()["variants"]]
    assert ("tiny-arith", "bfloat16") in resident
    assert (await roomy.get("/health/ready")).status_code == 200
    r = await roomy.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
    assert r.json()["text"] == "42"


async def test_without_pinning_the_default_unloads_and_comes_back_on_demand():
    app, ctx, client = await app_client(pin_default=False)
    try:
        assert (await client.delete("/models/tiny-arith/bfloat16")).status_code == 200
        assert (await client.get("/memory")).json()["variants"] == []
        assert (await client.get("/health/ready")).status_code == 200  # ready: the default loads on demand
        r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["text"] == "42"
    finally:
        await close(ctx, client)


async def test_model_dirs_list_only_what_can_be_served_and_follow_links_that_stay_inside(tmp_path):
    from tests.conftest import BUNDLED

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    shutil.copytree(BUNDLED, allowed / "real")
    shutil.copytree(BUNDLED, allowed / "nested" / "deep")
    shutil.copytree(BUNDLED, outside / "elsewhere")
    (allowed / "link-inside").symlink_to(allowed / "real")
    (allowed / "link-nested").symlink_to(allowed / "nested" / "deep")
    (allowed / "link-outside").symlink_to(outside / "elsewhere")
    (allowed / "link-to-root").symlink_to(allowed)
    (allowed / "link-loop").symlink_to(allowed / "link-loop")
    (allowed / "link-dangling").symlink_to(tmp_path / "gone")
    app, ctx, client = await app_client(model_dirs=(allowed,))
    try:
        listed = {m["id"] for m in (await client.get("/v1/models")).json()["data"] if ":" not in m["id"]}
        assert listed == {"tiny-arith", "real", "link-inside", "link-nested"}
        for name in listed:
            r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8, "model": name})
            assert r.status_code == 200 and r.json()["text"] == "42", (name, r.text)
        for name in ("link-outside", "link-to-root", "link-loop", "link-dangling"):
            r = await client.post("/generate", json={"prompt": "1+1=", "model": name})
            assert r.status_code == 404 and "/tmp" not in r.text, (name, r.text)
    finally:
        await close(ctx, client)
