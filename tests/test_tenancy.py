"""No leaks between clients: the prompt cache is reused only within one API key and one cache_salt, so
`cached_tokens` cannot be used as an oracle to read another client's prompt."""

import pytest

from tests.test_registry import app_client, close

KEYS = ("tenant-a-key", "tenant-b-key")
SECRET = "System: the vault code is 4242, tell no one. User: 17+25="


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
async def two_tenants():
    app, ctx, client = await app_client(api_key=KEYS, prompt_cache_bytes="64MiB")
    yield client
    await close(ctx, client)


async def cached_tokens(client, key: str, prompt: str, route: str = "/v1/completions", **extra) -> int:
    if route == "/generate":
        r = await client.post(route, json={"prompt": prompt, "max_tokens": 4, **extra}, headers=auth(key))
    elif route == "/v1/chat/completions":
        r = await client.post(route, json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                                           "temperature": 0, **extra}, headers=auth(key))
    else:
        r = await client.post(route, json={"prompt": prompt, "max_tokens": 4, "temperature": 0, **extra},
                              headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("route", ["/v1/completions", "/generate", "/v1/chat/completions"])
async def test_another_key_does_not_reuse_a_cached_prompt(two_tenants, route):
    client = two_tenants
    prompt = f"({route}) {SECRET}"
    assert await cached_tokens(client, KEYS[0], prompt, route) == 0
    assert await cached_tokens(client, KEYS[0], prompt, route) > 0  # the owner reuses it
    assert await cached_tokens(client, KEYS[1], prompt, route) == 0  # the other tenant does not


async def test_guessing_another_tenants_prompt_reveals_nothing(two_tenants):
    """The oracle attack: tenant B extends a known prefix by one character and watches cached_tokens."""
    client = two_tenants
    known = "Hidden system prompt: the password is "
    await cached_tokens(client, KEYS[0], known + "swordfish. 3+4=")
    await cached_tokens(client, KEYS[1], known)
    wrong = await cached_tokens(client, KEYS[1], known + "x")
    right = await cached_tokens(client, KEYS[1], known + "s")
    assert wrong > 0  # B reuses its own prefix...
    assert right == wrong  # ...and the right guess shows nothing more
    whole = await cached_tokens(client, KEYS[1], known + "swordfish. 3+4=")
    assert whole == right + 1  # its own earlier guess ("...s"), not the secret


async def test_the_cache_salt_separates_requests_of_one_key(two_tenants):
    client = two_tenants
    prompt = "Salted: a document only this conversation may reuse. 12+30="
    assert await cached_tokens(client, KEYS[0], prompt, cache_salt="conversation-1") == 0
    assert await cached_tokens(client, KEYS[0], prompt, cache_salt="conversation-1") > 0
    assert await cached_tokens(client, KEYS[0], prompt, cache_salt="conversation-2") == 0
    assert await cached_tokens(client, KEYS[0], prompt) == 0  # no salt is a scope of its own


async def test_without_keys_the_salt_still_isolates():
    app, ctx, client = await app_client(prompt_cache_bytes="64MiB")
    try:
        prompt = "Open server: my private notes say the answer is 9+9="
        body = {"prompt": prompt, "max_tokens": 4, "cache_salt": "alice"}
        first = (await client.post("/generate", json=body)).json()
        again = (await client.post("/generate", json=body)).json()
        other = (await client.post("/generate", json={**body, "cache_salt": "bob"})).json()
        assert first["text"] == again["text"] == other["text"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        await close(ctx, client)


def absolute_paths(value) -> list[str]:
    """Every string in a JSON value that looks like a path on the host."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in absolute_paths(v)]
    return [value] if isinstance(value, str) and (value.startswith(("/", "~")) or "/home/" in value
                                                  or "/root/" in value) else []


async def test_memory_names_files_not_paths(client):
    memory = (await client.get("/memory")).json()
    assert absolute_paths(memory) == []
    assert memory["device"]["blas"]["library"]  # still named


async def test_the_operator_may_ask_for_paths():
    app, ctx, client = await app_client(show_paths=True)
    try:
        library = (await client.get("/memory")).json()["device"]["blas"]["library"]
        assert library.startswith("/") or library in ("reference", "accelerate", "mlx-gpu")
    finally:
        await close(ctx, client)


async def test_a_report_over_one_tenants_prompts_is_not_shared_with_another(two_tenants):
    import asyncio

    client = two_tenants
    body = {"dtypes": ["bf16"], "prompts": ["Tenant A's confidential probe: 17+25="]}
    for _ in range(600):  # A's report gets under way
        mine = (await client.post("/v1/dtypes/report", json=body, headers=auth(KEYS[0]))).json()
        if mine["progress"] > 0 or mine["state"] != "running":
            break
        await asyncio.sleep(0.05)
    assert mine["progress"] > 0
    theirs = await client.post("/v1/dtypes/report", json=body, headers=auth(KEYS[1]))
    # B's is a report of its own, queued behind A's: nothing says that A asked for these prompts
    assert theirs.status_code == 202 and theirs.json()["stage"] == "queued" and theirs.json()["progress"] == 0
