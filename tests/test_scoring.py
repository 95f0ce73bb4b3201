"""Prompt scoring: /v1/completions with echo + logprobs, max_tokens 0, vLLM's prompt_logprobs, chat echo;
the numbers against a direct mlx-lm forward pass, batched against one at a time, and bad input."""

import asyncio
import json

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from models.decode.prefix_cache import PrefixCache
from models.decode.scoring import ScoreMemo, ScoreRequest, ScoreRow, score_batch, score_prompts
from tests.conftest import BUNDLED

DTYPES = {"float32": (mx.float32, 1e-4), "bfloat16": (mx.bfloat16, 2e-2)}


@pytest.fixture(scope="module")
def direct():
    """The bundled model through mlx-lm itself, per dtype (cast as a whole, as the server does)."""
    models = {}

    def get(dtype: str):
        if dtype not in models:
            model, tokenizer = load(str(BUNDLED))
            model.set_dtype(DTYPES[dtype][0])
            models[dtype] = (model, tokenizer)
        return models[dtype]

    return get


def reference_logprobs(model, tokens: list[int]) -> list[float]:
    """log p(tokens[i] | tokens[:i]) for i >= 1, from model(tokens)'s log-softmax."""
    logits = model(mx.array(tokens)[None]).astype(mx.float32)[0]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return [logprobs[i - 1, t].item() for i, t in enumerate(tokens) if i]


@pytest.mark.parametrize("dtype", list(DTYPES))
async def test_echo_logprobs_equal_mlx_lm(client, direct, dtype):
    model, tokenizer = direct(dtype)
    tokens = tokenizer.encode("12+34=46")
    r = await client.post("/v1/completions", json={"model": f"tiny-arith:{dtype}", "prompt": tokens, "echo": True,
                                                   "logprobs": 3, "max_tokens": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert body["model"] == f"tiny-arith:{dtype}" and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(tokens) and body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in tokens]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(reference_logprobs(model, tokens), abs=DTYPES[dtype][1])
    for picked, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert len(top) == 3 and max(top.values()) >= picked - 1e-6
        assert list(top.values()) == sorted(top.values(), reverse=True)


async def test_echo_then_generation_and_text_offsets(client):
    r = await client.post("/v1/completions", json={"prompt": "12+34=", "echo": True, "logprobs": 1,
                                                   "max_tokens": 4, "model": "tiny-arith:float32"})
    choice = r.json()["choices"][0]
    plain = (await client.post("/v1/completions", json={"prompt": "12+34=", "max_tokens": 4,
                                                        "model": "tiny-arith:float32"})).json()
    generated = plain["choices"][0]["text"]
    assert choice["text"] == "12+34=" + generated
    lp = choice["logprobs"]
    assert lp["tokens"][:7] == ["<bos>", "1", "2", "+", "3", "4", "="]
    assert lp["text_offset"][:8] == [0, 0, 1, 2, 3, 4, 5, 6]  # BOS is not in the echoed text
    assert r.json()["usage"]["prompt_tokens"] == 7


async def test_max_tokens_zero_needs_echo_and_echo_alone_returns_the_prompt(client):
    r = await client.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    body = (await client.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 0, "echo": True})).json()
    assert body["choices"][0]["text"] == "1+1=" and body["choices"][0]["logprobs"] is None


async def test_vllm_prompt_logprobs(client, direct):
    model, tokenizer = direct("float32")
    tokens = tokenizer.encode("7+8=15")
    body = (await client.post("/v1/completions", json={"prompt": "7+8=15", "prompt_logprobs": 2, "max_tokens": 0,
                                                       "model": "tiny-arith:float32"})).json()
    prompt_logprobs = body["choices"][0]["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(tokens)
    expected = reference_logprobs(model, tokens)
    for token, want, entry in zip(tokens[1:], expected, prompt_logprobs[1:], strict=True):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(want, abs=1e-4) and own["decoded_token"] == tokenizer.decode([token])
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert ranked[0]["rank"] == 1 and len(entry) in (2, 3)  # the top 2, plus the token when outside them


async def test_streaming_echo_sends_the_prompt_first(client):
    r = await client.post("/v1/completions", json={"prompt": "2+2=", "echo": True, "max_tokens": 3, "stream": True,
                                                   "logprobs": 0})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == "2+2=" and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) == 5
    later = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks[1:] if c["choices"][0]["text"]]
    assert later and later[0][0] == 4  # the generated text's offsets follow the prompt's


async def test_chat_echo_repeats_the_last_assistant_message(client):
    messages = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    body = (await client.post("/v1/chat/completions", json={"messages": messages, "echo": True,
                                                            "max_tokens": 2})).json()
    assert body["choices"][0]["message"]["content"].startswith("7")
    users = [{"role": "user", "content": "3+4="}]
    plain = (await client.post("/v1/chat/completions", json={"messages": users, "echo": True, "max_tokens": 2,
                                                             "temperature": 0})).json()
    same = (await client.post("/v1/chat/completions", json={"messages": users, "max_tokens": 2,
                                                            "temperature": 0})).json()
    assert plain["choices"][0]["message"]["content"] == same["choices"][0]["message"]["content"]


async def test_concurrent_scoring_gives_the_numbers_of_one_at_a_time(client):
    prompts = ["1+2=3", "45+67=112", "9+9=18", "100+1=101"]

    async def score(prompt: str) -> list:
        r = await client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2,
                                                       "max_tokens": 0, "model": "tiny-arith:float32"})
        return r.json()["choices"][0]["logprobs"]["token_logprobs"]

    alone = [await score(p) for p in prompts]
    together = await asyncio.gather(*(score(p) for p in prompts))
    for a, b in zip(alone, together, strict=True):
        assert a[0] is None and b[0] is None and a[1:] == pytest.approx(b[1:], abs=1e-4)


@pytest.mark.parametrize("body,status,words", [
    ({"prompt": "1+1=" * 400, "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "context length"),
    ({"prompt": [5] * 300, "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "context length"),
    ({"prompt": [5, 100], "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "token ids must be in [0, 100)"),
    ({"prompt": "1+1=", "echo": True, "logprobs": 21, "max_tokens": 0}, 422, "logprobs"),
    ({"prompt": "1+1=", "prompt_logprobs": -1, "max_tokens": 0}, 422, "prompt_logprobs"),
    ({"prompt": "1+1=", "echo": True, "max_tokens": -1}, 422, "max_tokens"),
    ({"prompt": [True, 3], "echo": True, "max_tokens": 0}, 422, "prompt"),
])
async def test_bad_scoring_input_is_a_clear_error(client, body, status, words):
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and "Traceback" not in r.text and "/work" not in r.text
    ok = await client.post("/v1/completions", json={"prompt": "1+1=", "echo": True, "logprobs": 1, "max_tokens": 1})
    assert ok.status_code == 200  # the model keeps serving


# ---- the scoring module itself ------------------------------------------------------------------
def test_padded_batch_equals_one_row_at_a_time(direct):
    model, tokenizer = direct("float32")
    prompts = [tokenizer.encode(t) for t in ("1+2=3", "45+67=112", "9=", "123+456=579")]
    together = score_batch(model, [ScoreRow(p) for p in prompts], top=3, vocab=100)
    for tokens, scored in zip(prompts, together, strict=True):
        alone = score_batch(model, [ScoreRow(tokens)], top=3, vocab=100)[0]
        assert [p.token for p in scored.positions] == tokens[1:]
        assert [p.logprob for p in scored.positions] == pytest.approx([p.logprob for p in alone.positions], abs=1e-5)
        assert [p.rank for p in scored.positions] == [p.rank for p in alone.positions]
        assert [p.logprob for p in scored.positions] == pytest.approx(reference_logprobs(model, tokens), abs=1e-4)
        assert scored.cache[0].offset == len(tokens)  # each row's own KV, for the prefix cache


def test_chunked_scoring_equals_one_pass(direct, monkeypatch):
    model, tokenizer = direct("float32")
    tokens = tokenizer.encode("12+34=46 and 56+78=134")
    whole = score_batch(model, [ScoreRow(tokens)], top=2, vocab=100)[0]
    monkeypatch.setattr("models.decode.scoring.MAX_LOGIT_ELEMENTS", 5 * 100)  # chunks of 5 positions
    chunked = score_batch(model, [ScoreRow(tokens)], top=2, vocab=100)[0]
    assert [p.logprob for p in chunked.positions] == pytest.approx([p.logprob for p in whole.positions], abs=1e-5)


def test_a_shared_context_is_reused_and_scores_the_same(direct):
    """lm-eval's pattern: one context, several continuations; the second starts from the first's KV."""
    model, tokenizer = direct("float32")
    context = tokenizer.encode("12+34=46. 45+21=66. 11+11=")
    first, second = context + tokenizer.encode("22", add_special_tokens=False), \
        context + tokenizer.encode("23", add_special_tokens=False)
    prefix, memo = PrefixCache(1 << 24), ScoreMemo()
    [(_, reused_first)] = score_prompts(model, 100, prefix, memo, [ScoreRequest(first, 2)])
    [(positions, reused)] = score_prompts(model, 100, prefix, memo, [ScoreRequest(second, 2)])
    assert reused_first == 0 and reused >= len(context) - 1
    assert [p.logprob for p in positions] == pytest.approx(reference_logprobs(model, second), abs=1e-4)
    # another scope never sees it
    [(_, other)] = score_prompts(model, 100, prefix, memo, [ScoreRequest(second, 2, scope="b")])
    assert other == 0


def test_scores_keep_the_kv_for_a_following_generation(direct):
    model, tokenizer = direct("float32")
    tokens = tokenizer.encode("12+34=46. 45+21=66. 11+11=")
    prefix = PrefixCache(1 << 24)
    score_prompts(model, 100, prefix, ScoreMemo(), [ScoreRequest(tokens, 0)])
    cache, reused = prefix.fetch(tokens)
    assert reused == len(tokens) - 1
    logits = model(mx.array(tokens[-1:])[None], cache=cache)[0, -1]
    fresh = model(mx.array(tokens)[None], cache=make_prompt_cache(model))[0, -1]
    assert mx.allclose(logits, fresh, atol=1e-4).item()


async def test_echo_lists_the_end_of_sequence_token_that_ends_it(client):
    """lm-eval sends max_tokens 1 and drops the last entry as the generated token: an end-of-sequence
    must be listed too (as vLLM does), or the prompt's last token would be dropped instead."""
    body = (await client.post("/v1/completions", json={"prompt": "17+25=42", "echo": True, "logprobs": 1,
                                                       "max_tokens": 1, "temperature": 0})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "17+25=42"
    tokens = choice["logprobs"]["tokens"]
    assert tokens[:-1] == ["<bos>", *"17+25=42"] and tokens[-1] == "<eos>"
    assert choice["logprobs"]["token_logprobs"][-1] <= 0
