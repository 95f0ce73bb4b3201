"""Odd Unicode in every text field of every generating route: never a 5xx, always JSON. Lone
surrogates (JSON escapes that are no Unicode text) are a 422, valid oddities are served."""

import json

import pytest

from tests.conftest import caught_by_catch_all

LONE = ["\\ud800", "\\udfff", "a\\udc00b", "\\udc00\\ud800"]  # high, low, inside text, a reversed pair
VALID = ["\\u0000", "\\ufeff", "\\uffff", "\\u202e", "e\\u0301", "\\ud83d\\ude00", "\\u00a0\\u2028"]


def bodies(text: str) -> list[tuple[str, str]]:
    """(route, raw JSON body) with `text` (JSON-escaped) in each text field a request may carry."""
    user = '{"role": "user", "content": "1+1="}'
    templates = [
        ("/generate", '{"max_tokens": 2, "prompt": "1+TEXT"}'),
        ("/generate", '{"max_tokens": 2, "prompt": "1+1=", "stop": ["TEXT"]}'),
        ("/v1/completions", '{"max_tokens": 2, "prompt": "1+TEXT"}'),
        ("/v1/completions", '{"max_tokens": 2, "prompt": ["1+TEXT"]}'),
        ("/v1/completions", '{"max_tokens": 2, "prompt": "1+1=", "user": "TEXT"}'),
        ("/v1/chat/completions", '{"max_tokens": 2, "messages": [{"role": "user", "content": "1+TEXT"}]}'),
        ("/v1/chat/completions",
         '{"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": "TEXT"}]}]}'),
        ("/v1/chat/completions", '{"max_tokens": 2, "messages": [{"role": "user", "content": "1", "name": "TEXT"}]}'),
        ("/v1/chat/completions", '{"max_tokens": 2, "messages": [{"role": "system", "content": "TEXT"}, USER]}'),
    ]
    return [(route, raw.replace("USER", user).replace("TEXT", text)) for route, raw in templates]


async def post(client, route: str, raw: str):
    r = await client.post(route, content=raw.encode(), headers={"content-type": "application/json"})
    return r, json.loads(r.text)


@pytest.mark.parametrize("text", LONE)
async def test_lone_surrogates_are_422_everywhere(client, text, caplog):
    for route, raw in bodies(text):
        r, body = await post(client, route, raw)
        assert r.status_code == 422, (route, raw, r.text)
        assert body["error"]["type"] == "invalid_request_error" and "retry-after" not in r.headers
    assert caught_by_catch_all(caplog) == []


@pytest.mark.parametrize("text", VALID)
async def test_valid_odd_unicode_is_served(client, text, caplog):
    for route, raw in bodies(text):
        r, body = await post(client, route, raw)
        assert r.status_code == 200, (route, raw, r.text)
        assert "usage" in body
    assert caught_by_catch_all(caplog) == []
