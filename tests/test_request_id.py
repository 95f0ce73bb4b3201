"""X-Request-Id: a client's id comes back on the response, a missing or unusable one is replaced by a new one,
on successes, errors, streams and refusals alike."""

from __future__ import annotations

import re

import httpx
import pytest

from server.app import create_app
from tests.conftest import make_settings

GENERATED = re.compile(r"[0-9a-f]{32}")


async def test_a_clients_id_comes_back(client):
    for method, path, body in [("POST", "/generate", {"prompt": "17+25=", "max_tokens": 8}), ("GET", "/health", None),
                               ("GET", "/memory", None), ("POST", "/generate", {"prompt": 3}),  # 422
                               ("GET", "/no-such-route", None)]:
        r = await client.request(method, path, json=body, headers={"X-Request-Id": "trace-7f:a/b.c_d=@+"})
        assert r.headers["x-request-id"] == "trace-7f:a/b.c_d=@+", (method, path, r.status_code)


async def test_without_an_id_each_response_gets_a_new_one(client):
    ids = {(await client.get("/health")).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(GENERATED.fullmatch(i) for i in ids)


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "semi;colon", "quote\"", "tab\tx", "é"])
async def test_an_unusable_id_is_replaced_not_echoed(client, given):
    r = await client.get("/health", headers={"X-Request-Id": given.encode()})
    assert r.status_code == 200 and GENERATED.fullmatch(r.headers["x-request-id"])
    assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]]


async def test_a_stream_carries_the_id(client):
    async with client.stream("POST", "/generate", headers={"X-Request-Id": "stream-1"},
                             json={"prompt": "17+25=", "max_tokens": 8, "stream": True}) as r:
        assert r.headers["x-request-id"] == "stream-1"
        assert "[DONE]" in "".join([line async for line in r.aiter_lines()])


async def test_refusals_and_internal_errors_carry_the_id_too():
    app = create_app(make_settings(api_key=("k",), warmup=False, max_body_bytes=2048))

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    async with app.router.lifespan_context(app):
        await app.state.start_task
        # Starlette re-raises an unhandled error after answering 500; a server would log it, not crash
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.get("/memory", headers={"X-Request-Id": "no-key-1"})
            assert r.status_code == 401 and r.headers["x-request-id"] == "no-key-1"
            r = await c.post("/generate", content=b"x" * 4096,
                             headers={"X-Request-Id": "big-1", "Authorization": "Bearer k"})
            assert r.status_code == 413 and r.headers["x-request-id"] == "big-1"
            r = await c.get("/broken", headers={"X-Request-Id": "bug-1", "Authorization": "Bearer k"})
            assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
            assert r.json()["error"]["type"] == "internal_error"
