"""float16 overflow while serving: a warning by default, a refusal under the `refuse` policy."""

import asyncio
import json

import httpx
import mlx.core as mx
import pytest

from models.testing.synthetic import llama_config, make_llama_checkpoint
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


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python writes but JSON does not have."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def sse_events(text: str) -> list:
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [strict_json(d) for d in data[:-1]]


async def test_logprobs_of_non_finite_logits_are_null_in_valid_json(model_dir):
    ctx, client = await serve(model_dir)
    try:
        completion = {"prompt": "The cat", "model": "overflow:float16", "max_tokens": 3, "logprobs": 2}
        chat = {"model": "overflow:float16", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "logprobs": True, "top_logprobs": 2}
        r = await client.post("/v1/completions", json=completion)
        assert r.status_code == 200, r.text
        logprobs = strict_json(r.text)["choices"][0]["logprobs"]
        assert logprobs["token_logprobs"] == [None] * 3
        assert all(v is None for top in logprobs["top_logprobs"] for v in top.values())
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        content = strict_json(r.text)["choices"][0]["logprobs"]["content"]
        assert [e["logprob"] for e in content] == [None] * 3
        assert all(t["logprob"] is None for e in content for t in e["top_logprobs"])
        for route, request in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
            r = await client.post(route, json={**request, "stream": True})
            assert r.status_code == 200
            assert len(sse_events(r.text)) >= 2
        finite = await client.post("/v1/completions", json={**completion, "model": "overflow:float32"})
        assert all(isinstance(v, float) for v in finite.json()["choices"][0]["logprobs"]["token_logprobs"])
    finally:
        await client.aclose()
        await ctx.__aexit__(None, None, None)
