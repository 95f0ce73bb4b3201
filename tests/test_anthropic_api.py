"""POST /v1/messages and /v1/messages/count_tokens driven by the official `anthropic` package against a real
server process (the bundled model with a template that renders tools: tests/conftest.py `tools_model`; its
tokenizer is character-level, so a rendered prompt's token count is 1 (BOS) + its length). This SDK has no
sampling arguments, so greedy decoding goes in `extra_body`."""

import anthropic
import httpx
import pytest

from server.app import create_app
from tests.conftest import fail_first_step, make_settings, sse_events

MODEL = "tiny-arith-tools"
GREEDY = {"extra_body": {"temperature": 0}}
ASK = [{"role": "user", "content": "17+25="}]
ADD = {"name": "add", "description": "adds", "input_schema": {"type": "object"}}


@pytest.fixture(scope="module")
def claude(tools_server):
    return anthropic.Anthropic(base_url=tools_server, api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_message_each_dtype(claude, dtype):
    m = claude.messages.create(model=f"{MODEL}:{dtype}", max_tokens=8, messages=ASK, **GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [(b.type, b.text) for b in m.content] == [("text", "42")]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None and m.model == f"{MODEL}:{dtype}"
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == 7 and m.usage.output_tokens >= 2
    by_field = claude.messages.create(model=MODEL, max_tokens=8, messages=ASK,
                                      extra_body={"temperature": 0, "dtype": dtype})
    assert by_field.model == f"{MODEL}:{dtype}" and by_field.content[0].text == "42"


def test_stop_reasons(claude):
    stopped = claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, stop_sequences=["x", "2"], **GREEDY)
    assert stopped.content[0].text == "4"
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "2"
    cut = claude.messages.create(model=MODEL, max_tokens=1, messages=ASK, **GREEDY)
    assert cut.content[0].text == "4" and cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 1


def test_streamed_events(claude):
    events = list(claude.messages.create(model=MODEL, max_tokens=20, stream=True,
                                         messages=[{"role": "user", "content": "The cat"}], **GREEDY))
    types = [e.type for e in events]
    deltas = types.count("content_block_delta")
    assert deltas >= 1
    assert types == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    whole = claude.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "The cat"}],
                                   **GREEDY)
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == whole.content[0].text
    assert events[-2].delta.stop_reason == whole.stop_reason and events[-2].usage.output_tokens > 0
    with claude.messages.stream(model=MODEL, max_tokens=8, messages=ASK, **GREEDY) as stream:
        assert "".join(stream.text_stream) == "42"
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.input_tokens + final.usage.cache_read_input_tokens == 7


def test_system_tools_and_tool_history_are_rendered(claude):
    history = [{"role": "user", "content": "1+2="},
               {"role": "assistant", "content": [{"type": "text", "text": "="},
                                                 {"type": "tool_use", "id": "t1", "name": "add",
                                                  "input": {"a": 1, "b": 2}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "3"},
                                            {"type": "text", "text": "17+25="}]}]
    rendered = 'add;\nAdd: 1+2==add{"a": 1, "b": 2}317+25='  # tools, system, then each turn
    count = claude.messages.count_tokens(model=MODEL, system="Add: ", tools=[ADD], messages=history)
    assert count.input_tokens == 1 + len(rendered)
    m = claude.messages.create(model=MODEL, max_tokens=4, system=[{"type": "text", "text": "Add: "}], tools=[ADD],
                               messages=history, **GREEDY)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == count.input_tokens
    assert [b.type for b in m.content] == ["text"]  # auto: this model has no tool-call syntax
    without = claude.messages.count_tokens(model=MODEL, messages=ASK, tools=[ADD], tool_choice={"type": "none"})
    assert without.input_tokens == 7


def test_errors_in_anthropic_shape(claude, tools_server):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nope", max_tokens=8, messages=ASK)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:  # a validation error is a 400 in this API
        claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, extra_body={"temperature": 1.5})
    assert e.value.body["error"] == {"type": "invalid_request_error",
                                     "message": "temperature: Input should be less than or equal to 1"}
    with pytest.raises(anthropic.BadRequestError, match="top_k: not supported"):
        claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, extra_body={"top_k": 5})
    with pytest.raises(anthropic.BadRequestError, match="not among the tools"):
        claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, tools=[ADD],
                               tool_choice={"type": "tool", "name": "sub"})
    with pytest.raises(anthropic.BadRequestError, match="needs the tool's `name`"):
        claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, tools=[ADD], tool_choice={"type": "tool"})
    with pytest.raises(anthropic.BadRequestError, match="no tools given"):
        claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, tool_choice={"type": "any"})
    with pytest.raises(anthropic.BadRequestError, match="tool_use blocks belong in assistant messages"):
        claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "add", "input": {}}]}])
    r = httpx.post(f"{tools_server}/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "request body is not valid JSON"}}
    r = httpx.post(f"{tools_server}/v1/messages", json={"model": MODEL, "messages": ASK})
    assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens: Field required"
    assert claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, **GREEDY).content[0].text == "42"


async def test_tools_on_a_template_without_them_are_refused(client):
    r = await client.post("/v1/messages", json={"model": "tiny-arith", "max_tokens": 8, "messages": ASK,
                                                "tools": [ADD]})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "tools: this model's chat template does not render tools"}}


async def test_key_and_body_limit_errors_in_anthropic_shape():
    """The API key and body limit are checked before routing; those errors take the front door's shape too."""
    app = create_app(make_settings(api_key=("secret",), max_body_bytes=1024, warmup=False))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.post("/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": ASK})
        assert r.status_code == 401 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "authentication_error"
        r = await c.post("/v1/messages/count_tokens", content=b"x" * 2000, headers={"authorization": "Bearer secret"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        r = await c.post("/v1/chat/completions", json={"messages": ASK})
        assert r.status_code == 401 and r.json()["error"]["status"] == 401  # the OpenAI shape elsewhere


async def test_a_failure_mid_stream_is_an_error_event(client, monkeypatch):
    fail_first_step(monkeypatch)
    r = await client.post("/v1/messages", json={"model": "tiny-arith", "max_tokens": 8, "messages": ASK,
                                                "stream": True})
    events = sse_events(r.text)
    assert [name for name, _ in events] == ["message_start", "error"]  # blocks open with their first content
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "overloaded_error"
    monkeypatch.undo()
    r = await client.post("/v1/messages", json={"model": "tiny-arith", "max_tokens": 8, "messages": ASK,
                                                "temperature": 0})
    assert r.json()["content"][0]["text"] == "42"


def test_the_model_string_given_at_start_is_accepted(claude, tools_model):
    m = claude.messages.create(model=f"{tools_model}:float32", max_tokens=8, messages=ASK, **GREEDY)
    assert m.content[0].text == "42" and m.model == f"{MODEL}:float32"
    assert claude.messages.count_tokens(model=str(tools_model), messages=ASK).input_tokens == 7
