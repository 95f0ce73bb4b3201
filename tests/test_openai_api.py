"""The OpenAI-compatible API, driven by the real `openai` package against a real server."""

import openai
import pytest
from openai import OpenAI

DTYPES = ["float32", "bfloat16", "float16"]


@pytest.fixture(scope="module")
def oai(live_server):
    return OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_each_dtype_variant(oai):
    ids = {m.id for m in oai.models.list().data}
    assert "tiny-arith" in ids
    assert {f"tiny-arith:{d}" for d in DTYPES} <= ids


@pytest.mark.parametrize("dtype", DTYPES)
def test_chat_completion_each_dtype(oai, dtype):
    r = oai.chat.completions.create(model=f"tiny-arith:{dtype}", temperature=0, max_tokens=8,
                                    messages=[{"role": "user", "content": "17+25="}])
    assert r.choices[0].message.content == "42"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == f"tiny-arith:{dtype}"
    assert r.usage.completion_tokens >= 2 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("dtype", DTYPES)
def test_completion_each_dtype_with_extra_body(oai, dtype):
    r = oai.completions.create(model="tiny-arith", prompt="17+25=", temperature=0, max_tokens=8,
                               extra_body={"dtype": dtype})
    assert r.choices[0].text == "42"
    assert r.model == f"tiny-arith:{dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_chat_matches_the_unstreamed(oai, dtype):
    kwargs = dict(model=f"tiny-arith:{dtype}", temperature=0, max_tokens=30,
                  messages=[{"role": "user", "content": "The cat"}])
    whole = oai.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.model == f"tiny-arith:{dtype}" for c in chunks)


def test_streamed_completion(oai):
    chunks = list(oai.completions.create(model="tiny-arith:bfloat16", prompt="23+19=", temperature=0,
                                         max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "42"


def test_stop_seed_and_logprobs(oai):
    base = dict(model="tiny-arith", prompt="The dog", max_tokens=24, temperature=0.9, seed=42)
    a = oai.completions.create(**base).choices[0].text
    b = oai.completions.create(**base).choices[0].text
    assert a == b
    greedy = oai.completions.create(model="tiny-arith", prompt="17+25=", temperature=0, max_tokens=8, logprobs=3)
    lp = greedy.choices[0].logprobs
    assert "".join(lp.tokens) == "42"
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    chat = oai.chat.completions.create(model="tiny-arith", temperature=0, max_tokens=8, logprobs=True, top_logprobs=2,
                                       messages=[{"role": "user", "content": "17+25="}])
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == ["4", "2"]
    assert content[0].top_logprobs[0].token == "4"
    stopped = oai.completions.create(model="tiny-arith", prompt="17+25=", temperature=0, max_tokens=8, stop=["2"])
    assert stopped.choices[0].text == "4" and stopped.choices[0].finish_reason == "stop"


def test_errors_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "not available" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tiny-arith", n=2, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tiny-arith:float16", messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"dtype": "bfloat16"})
    with pytest.raises(openai.NotFoundError):  # "float8" is no dtype, so the whole id is an unknown model
        oai.completions.create(model="tiny-arith:float8", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny-arith", prompt="1" * 300, max_tokens=10)
