"""API keys on every route but the probes, body limits, CORS closed by default."""

import httpx
import pytest

from server.app import create_app
from server.routes.console import PUBLIC_PATHS
from tests.conftest import make_settings

KEYS = ("key-one", "second-key")


@pytest.fixture(scope="module")
async def secured():
    app = create_app(make_settings(api_key=KEYS, max_body_bytes=4096, warmup=False))
    async with app.router.lifespan_context(app):
        await app.state.start_task
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


def routes(app):
    """Every (method, path) the app serves: the OpenAPI operations plus the docs routes."""
    found = set()
    for path, operations in app.openapi()["paths"].items():
        found |= {(method.upper(), path) for method in operations}
    for route in app.routes:
        if hasattr(route, "path"):
            found |= {(m, route.path) for m in getattr(route, "methods", ()) if m != "HEAD"}
    for method, path in sorted(found):
        yield method, path.replace("{model}", "tiny-arith").replace("{dtype}", "bfloat16")


async def test_every_route_but_health_needs_a_key(secured):
    app, client = secured
    seen = 0
    for method, path in routes(app):
        r = await client.request(method, path, json={})
        if path in ("/health", "/health/ready") or path in PUBLIC_PATHS:  # probes; the console page holds no data
            assert r.status_code == 200, path
        else:
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
            seen += 1
    assert seen >= 10  # generate, v1 routes, memory, models, docs, openapi...


@pytest.mark.parametrize("key", KEYS)
async def test_each_configured_key_works(secured, key):
    _, client = secured
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8},
                          headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["text"] == "42"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ", "Bearer wrong", "Basic key-one", "key-one",
                                    "Bearer key-one-extra", "Bearer KEY-ONE"])
async def test_wrong_or_missing_keys_are_refused(secured, header):
    _, client = secured
    headers = {"Authorization": header} if header is not None else {}
    r = await client.post("/generate", json={"prompt": "1+1="}, headers=headers)
    assert r.status_code == 401


@pytest.mark.parametrize("path", ["//generate", "/GENERATE", "/v1//models", "/V1/models", "/health/../v1/models",
                                  "/health%2F..%2Fv1%2Fmodels", "/health/", "/%2Fv1/models", "/v1/models%00",
                                  "/health/ready/../../memory"])
async def test_path_tricks_do_not_bypass_the_key(secured, path):
    _, client = secured
    r = await client.request("GET", httpx.URL("http://test" + path), headers={"Host": "localhost"})
    assert r.status_code == 401, (path, r.status_code)


async def test_forged_host_does_not_bypass_the_key(secured):
    _, client = secured
    for host in ("localhost", "127.0.0.1", "internal"):
        r = await client.get("/v1/models", headers={"Host": host, "X-Forwarded-For": "127.0.0.1"})
        assert r.status_code == 401


async def test_large_bodies_are_413_before_parsing(secured):
    _, client = secured
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    r = await client.post("/generate", content=b'{"prompt": "' + b"a" * 5000 + b'"}',
                          headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"a" * 1000

    r = await client.post("/generate", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413


async def test_cors_is_closed_by_default(client):
    r = await client.options("/generate", headers={"Origin": "http://evil.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
async def browser_facing():
    """API keys and CORS for one origin, as a server that browsers call."""
    app = create_app(make_settings(api_key=KEYS, cors_origins=(ORIGIN,), warmup=False))
    async with app.router.lifespan_context(app):
        await app.state.start_task
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=60) as client:
            yield client


def preflight(origin: str) -> dict:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}


async def test_cors_preflight_needs_no_key_but_the_request_does(browser_facing):
    r = await browser_facing.options("/v1/chat/completions", headers=preflight(ORIGIN))
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    chat = {"messages": [{"role": "user", "content": "17+25="}], "max_tokens": 8}
    refused = await browser_facing.post("/v1/chat/completions", json=chat, headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert refused.headers["access-control-allow-origin"] == ORIGIN  # the page can read why
    ok = await browser_facing.post("/v1/chat/completions", json=chat,
                                   headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEYS[0]}"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "42"
    assert ok.headers["access-control-allow-origin"] == ORIGIN


async def test_cors_preflight_of_another_origin_is_a_json_refusal(browser_facing):
    r = await browser_facing.options("/v1/chat/completions", headers=preflight("https://evil.example"))
    assert r.status_code == 400 and "origin" in r.json()["error"]["message"]
    assert "access-control-allow-origin" not in r.headers
    plain = await browser_facing.options("/v1/chat/completions")  # not a preflight: the key applies
    assert plain.status_code == 401
