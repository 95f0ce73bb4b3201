"""POST /generate against the real app and the real bundled model, in-process over ASGI."""

import asyncio
import json

import pytest

DTYPES = ["float32", "bfloat16", "float16"]


async def generate(client, **body):
    return await client.post("/generate", json=body)


async def test_health_and_readiness(client):
    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    r = await client.get("/health/ready")
    assert r.status_code == 200 and r.json()["ready"] is True


async def test_default_dtype_is_the_checkpoint_dtype(client):
    r = await generate(client, prompt="17+25=", max_tokens=8)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dtype"] == "bfloat16"  # the bundled checkpoint is stored in bfloat16
    assert body["model"] == "tiny-arith"
    assert body["text"] == "42"
    assert body["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] >= 2
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["timings"]["time_to_first_token_s"] > 0


@pytest.mark.parametrize("dtype", DTYPES)
async def test_each_dtype_serves_and_really_is_that_dtype(client, dtype):
    r = await generate(client, prompt="31+46=", dtype=dtype, max_tokens=8)
    assert r.status_code == 200, r.text
    assert r.json()["dtype"] == dtype
    assert r.json()["text"] == "77"
    variants = (await client.get("/memory")).json()["variants"]
    variant = next(v for v in variants if v["dtype"] == dtype)
    assert variant["floating_dtypes"] == [dtype]
    assert set(variant["bytes_by_dtype"]) == {dtype}
    assert variant["total_bytes"] == sum(variant["bytes_by_dtype"].values())


async def test_aliases_resolve_to_one_variant(client):
    r1 = await generate(client, prompt="12+30=", dtype="fp16", max_tokens=6)
    r2 = await generate(client, prompt="12+30=", dtype="half", max_tokens=6)
    assert r1.json()["dtype"] == r2.json()["dtype"] == "float16"
    variants = (await client.get("/memory")).json()["variants"]
    assert len([v for v in variants if v["dtype"] == "float16"]) == 1


@pytest.mark.parametrize("dtype", DTYPES)
async def test_greedy_output_is_deterministic(client, dtype):
    body = {"prompt": "The cat", "dtype": dtype, "max_tokens": 24}
    texts = {(await generate(client, **body)).json()["text"] for _ in range(3)}
    assert len(texts) == 1


async def test_seeded_sampling_is_reproducible(client):
    body = {"prompt": "The ", "temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 24}
    first = (await generate(client, **body)).json()["text"]
    second = (await generate(client, **body)).json()["text"]
    assert first == second
    others = {(await generate(client, **{**body, "seed": s})).json()["text"] for s in range(5)}
    assert len(others) > 1  # the seed matters


async def test_max_tokens_limits_the_completion(client):
    r = await generate(client, prompt="The ", max_tokens=3)
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 3
    if body["usage"]["completion_tokens"] == 3:
        assert body["finish_reason"] == "length"


async def test_stop_strings_cut_the_text(client):
    full = (await generate(client, prompt="The cat", max_tokens=40)).json()["text"]
    assert len(full) > 4
    stop = full[2:4]
    r = await generate(client, prompt="The cat", max_tokens=40, stop=[stop])
    body = r.json()
    assert body["finish_reason"] == "stop"
    assert body["text"] == full[: full.index(stop)]


async def test_streaming_sends_deltas_then_the_summary(client):
    async with client.stream("POST", "/generate", json={"prompt": "23+19=", "stream": True, "max_tokens": 8}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in [x async for x in r.aiter_lines()] if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    final = events[-1]
    assert final["finish_reason"] == "stop" and final["dtype"] == "bfloat16"
    assert "".join(e["text"] for e in events) == "42"
    non_stream = (await generate(client, prompt="23+19=", max_tokens=8)).json()["text"]
    assert non_stream == "42"


def assert_error(r, status, words=()):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and error["type"] and error["message"]
    for w in words:
        assert w in error["message"]
    assert "Traceback" not in r.text and "/work" not in r.text and "site-packages" not in r.text


@pytest.mark.parametrize("body,words", [
    ({}, ["prompt"]),
    ({"prompt": ""}, ["prompt"]),
    ({"prompt": 17}, ["prompt"]),
    ({"prompt": "1+1=", "dtype": "float8"}, ["float8", "auto", "float32", "float16", "bfloat16"]),
    ({"prompt": "1+1=", "dtype": None, "max_tokens": -1}, ["max_tokens"]),
    ({"prompt": "1+1=", "max_tokens": 0}, ["max_tokens"]),
    ({"prompt": "1+1=", "max_tokens": 10**12}, ["max_tokens"]),
    ({"prompt": "1+1=", "max_tokens": "10"}, ["max_tokens"]),
    ({"prompt": "1+1=", "max_tokens": 1.5}, ["max_tokens"]),
    ({"prompt": "1+1=", "max_tokens": True}, ["max_tokens"]),
    ({"prompt": "1+1=", "temperature": -1}, ["temperature"]),
    ({"prompt": "1+1=", "top_p": 0}, ["top_p"]),
    ({"prompt": "1+1=", "stream": "yes"}, ["stream"]),
    ({"prompt": "1+1=", "max_tokns": 5}, ["max_tokns", "unknown field"]),
    ({"prompt": "1+1=", "stop": ["a"] * 50}, ["stop"]),
])
async def test_bad_input_is_a_422_and_the_server_keeps_serving(client, body, words):
    assert_error(await generate(client, **body), 422, words)
    ok = await generate(client, prompt="40+2=", max_tokens=6)
    assert ok.status_code == 200 and ok.json()["text"] == "42"


async def test_malformed_json_and_non_object_bodies(client):
    r = await client.post("/generate", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert_error(r, 400, ["JSON"])
    r = await client.post("/generate", content=b'["prompt"]', headers={"content-type": "application/json"})
    assert_error(r, 400, ["JSON object"])
    r = await client.post("/generate", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert_error(r, 400, ["JSON"])
    r = await client.post("/generate", content=b'"just a string"', headers={"content-type": "application/json"})
    assert_error(r, 400, ["JSON object"])
    r = await client.post("/generate", content=b'{"prompt": NaN}', headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    r = await client.post("/generate", content=b'{"prompt": "1+1=", "temperature": NaN}',
                          headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)


@pytest.mark.parametrize("name", ["nope", "../tiny-arith", "/etc", "http://example.com/x", "tiny-arith/.."])
async def test_unknown_and_path_like_models_are_404(client, name):
    assert_error(await generate(client, prompt="1+1=", model=name), 404, ["not available"])


async def test_prompt_beyond_the_context_is_a_400_before_prefill(client):
    r = await generate(client, prompt="1" * 600, max_tokens=8)
    assert_error(r, 400, ["context length"])


async def test_unknown_route_is_json_404(client):
    assert_error(await client.get("/nope"), 404)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_requests_joining_midway_do_not_change_greedy_outputs(app, client, dtype):
    """A lone request decodes outside the batch and moves into it when others arrive."""
    handoffs = app.state.engine.stats.handoffs
    long = {"prompt": "The dog", "dtype": dtype, "max_tokens": 120, "ignore_eos": True}
    sums = [{"prompt": f"{a}+{a + 3}=", "dtype": dtype, "max_tokens": 8} for a in (11, 23, 35)]
    alone = (await generate(client, **long)).json()["text"]
    expected = [(await generate(client, **s)).json()["text"] for s in sums]

    async def later(body, delay):
        await asyncio.sleep(delay)
        return await generate(client, **body)

    results = await asyncio.gather(generate(client, **long), *(later(s, 0.05 * (i + 1)) for i, s in enumerate(sums)))
    assert results[0].json()["text"] == alone
    assert results[0].json()["usage"]["completion_tokens"] == 120
    assert [r.json()["text"] for r in results[1:]] == expected
    assert app.state.engine.stats.handoffs > handoffs
