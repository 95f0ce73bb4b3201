"""POST /tokenize and /detokenize (vLLM's shapes), and the model id given to --model, on the real app."""

import httpx
import pytest

from tests.conftest import BUNDLED

CHAT = [{"role": "user", "content": "17+25="}]
ADD = {"type": "function", "function": {"name": "add", "description": "adds", "parameters": {"type": "object"}}}


async def test_prompt_tokens_are_the_ones_generation_counts(client):
    r = await client.post("/tokenize", json={"prompt": "17+25=", "return_token_strs": True})
    assert r.status_code == 200
    body = r.json()
    assert body["token_strs"] == ["<bos>", "1", "7", "+", "2", "5", "="]  # a character-level vocabulary
    assert body["count"] == len(body["tokens"]) == 7 and body["max_model_len"] == 256
    done = (await client.post("/v1/completions", json={"prompt": "17+25=", "max_tokens": 2})).json()
    assert done["usage"]["prompt_tokens"] == body["count"]
    plain = (await client.post("/tokenize", json={"prompt": "17+25=", "add_special_tokens": False})).json()
    assert plain["tokens"] == body["tokens"][1:] and "token_strs" not in plain


async def test_chat_tokens_are_the_ones_the_chat_endpoint_counts(client):
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+2="}]
    body = (await client.post("/tokenize", json={"messages": messages, "return_token_strs": True})).json()
    assert "".join(body["token_strs"]) == "<bos>Add.1+2="  # the bundled template: BOS, then the contents
    done = (await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})).json()
    assert done["usage"]["prompt_tokens"] == body["count"]


async def test_detokenize_round_trips(client):
    tokens = (await client.post("/tokenize", json={"prompt": "The cat", "add_special_tokens": False})).json()
    r = await client.post("/detokenize", json={"tokens": tokens["tokens"], "model": "tiny-arith"})
    assert r.status_code == 200 and r.json() == {"prompt": "The cat"}


async def test_bad_input_is_a_clear_error(client):
    r = await client.post("/detokenize", json={"tokens": [5, 100]})  # the vocabulary has 100 ids
    assert r.status_code == 400 and r.json()["error"]["message"] == "tokens: ids must be in [0, 100)"
    r = await client.post("/tokenize", json={"prompt": "hi", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
    r = await client.post("/tokenize", json={"messages": CHAT, "tools": [ADD]})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "tools: this model's chat template does not render tools"
    r = await client.post("/tokenize", json={"prompt": "hi", "messages": CHAT})
    assert r.status_code == 422
    assert (await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 4})).json()["text"] == "42"


def test_tools_are_rendered_where_the_template_supports_them(tools_server):
    plain = httpx.post(f"{tools_server}/tokenize", json={"messages": CHAT, "return_token_strs": True}).json()
    with_tools = httpx.post(f"{tools_server}/tokenize", json={"messages": CHAT, "tools": [ADD, {
        "type": "function", "function": {"name": "mul"}}], "return_token_strs": True}).json()
    assert "".join(plain["token_strs"]) == "<bos>17+25="
    assert "".join(with_tools["token_strs"]) == "<bos>add;mul;\n17+25="


@pytest.mark.parametrize("as_given", [str(BUNDLED), f"{BUNDLED}:float32"])
async def test_the_model_string_given_at_start_is_a_model_id(client, as_given):
    """vLLM's and mlx_lm.server's clients send back the --model string as the model id."""
    r = await client.get("/memory/estimate", params={"model": str(BUNDLED)})
    assert r.status_code == 200 and {e["model"] for e in r.json()["estimates"]} == {"tiny-arith"}
    r = await client.post("/v1/chat/completions", json={"model": as_given, "messages": CHAT, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "42"
    assert r.json()["model"].startswith("tiny-arith:")
    r = await client.post("/generate", json={"model": str(BUNDLED), "prompt": "17+25=", "dtype": "float32"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-arith"
    variants = (await client.get("/memory")).json()["variants"]
    assert all(v["model"] == "tiny-arith" for v in variants)  # one set of variants, not one per id


async def test_chat_logprobs_null_is_accepted(client):
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "logprobs": None})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    assert r.json()["choices"][0]["message"]["content"] == "42"
