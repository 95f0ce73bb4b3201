"""float16 overflow while serving: a warning by default, a refusal under the `refuse` policy."""

import asyncio

import httpx
import mlx.core as mx
import pytest

from models.synthetic import llama_config, make_llama_checkpoint
from server.app import create_app
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("overflow")
    folder = make_llama_checkpoint(root / "overflow", llama_config(hidden=128, layers=2, vocab=100, context=256))
    weights = mx.load(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1e6  # logits far beyond float16's 65504
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    return root


async def serve(model_dir, **settings):
    app = create_app(make_settings(model_dirs=(model_dir,), warmup=False, **settings))
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    await app.state.start_task
    return ctx, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120)


def body(dtype):
    return {"prompt": "The cat", "model": "overflow", "dtype": dtype, "max_tokens": 4}


async def test_overflow_warns_by_default_and_finite_dtypes_do_not(model_dir):
    ctx, client = await serve(model_dir)
    try:
        r = await client.post("/generate", json=body("float16"))
        assert r.status_code == 200
        assert any("float16" in w and "non-finite" in w for w in r.json()["warnings"])
        for dtype in ("float32", "bfloat16"):
            assert (await client.post("/generate", json=body(dtype))).json()["warnings"] == []
        normal = await client.post("/generate", json={"prompt": "17+25=", "dtype": "float16", "max_tokens": 8})
        assert normal.json()["warnings"] == [] and normal.json()["text"] == "42"
        chat = await client.post("/v1/chat/completions", json={
            "model": "overflow:float16", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["warnings"]
    finally:
        await client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_overflow_in_a_batch_warns_every_request(model_dir):
    """Requests decoding together (batch rows are checked every few steps and at their last step)."""
    ctx, client = await serve(model_dir)
    try:
        lengths = (1, 3, 6, 9)  # ends before, at and between the batch's periodic checks
        replies = await asyncio.gather(*(client.post("/generate", json={**body("float16"), "max_tokens": n})
                                         for n in lengths))
        for reply, n in zip(replies, lengths, strict=True):
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == n
            assert any("non-finite" in w for w in reply.json()["warnings"]), n
        fine = await asyncio.gather(*(client.post("/generate", json={**body("float32"), "max_tokens": n})
                                      for n in lengths))
        assert all(r.json()["warnings"] == [] for r in fine)
    finally:
        await client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_refuse_policy_refuses_the_dtype_and_keeps_the_rest(model_dir):
    ctx, client = await serve(model_dir, nonfinite_policy="refuse")
    try:
        r = await client.post("/generate", json=body("float16"))
        assert r.status_code == 422 and r.json()["error"]["type"] == "dtype_refused"
        again = await client.post("/generate", json=body("float16"))
        assert again.status_code == 422 and "float16" in again.json()["error"]["message"]
        assert (await client.post("/generate", json=body("float32"))).status_code == 200
        ok = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["text"] == "42"
    finally:
        await client.aclose()
        await ctx.__aexit__(None, None, None)
