"""POST /v1/responses driven by the official `openai` package against a real server process. The server
runs the bundled model with a template that renders tools (tests/conftest.py `tools_model`); its tokenizer
is character-level, so a rendered prompt's token count is 1 (BOS) + its length."""

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import fail_first_step, sse_events

MODEL = "tiny-arith-tools"
ADD = {"type": "function", "name": "add", "description": "adds", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def oai(tools_server):
    return OpenAI(base_url=f"{tools_server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_text_input_each_dtype(oai, dtype):
    r = oai.responses.create(model=f"{MODEL}:{dtype}", input="17+25=", temperature=0)
    assert r.output_text == "42" and r.status == "completed" and r.model == f"{MODEL}:{dtype}"
    assert r.object == "response" and r.id.startswith("resp_")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.input_tokens == 7 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    by_field = oai.responses.create(model=MODEL, input="17+25=", temperature=0, extra_body={"dtype": dtype})
    assert by_field.model == f"{MODEL}:{dtype}" and by_field.output_text == "42"


def test_message_list_with_instructions_is_rendered_in_order(oai):
    r = oai.responses.create(model=MODEL, instructions="Add: ", temperature=0, max_output_tokens=16, input=[
        {"role": "user", "content": "1+2="}, {"role": "assistant", "content": [{"type": "output_text", "text": "3"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "17+25="}]}])
    rendered = "Add: 1+2=317+25="
    assert r.usage.input_tokens == 1 + len(rendered) and r.instructions == "Add: "
    same = oai.completions.create(model=MODEL, prompt=rendered, temperature=0, max_tokens=16)
    assert r.output_text == same.choices[0].text


def test_max_output_tokens_makes_it_incomplete(oai):
    r = oai.responses.create(model=MODEL, input="17+25=", temperature=0, max_output_tokens=1)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "4" and r.usage.output_tokens == 1 and r.max_output_tokens == 1


def test_streamed_events_in_order(oai):
    events = list(oai.responses.create(model=MODEL, input="The cat", temperature=0, max_output_tokens=20,
                                       stream=True))
    types = [e.type for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     types[-1]]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    whole = oai.responses.create(model=MODEL, input="The cat", temperature=0, max_output_tokens=20)
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].type == f"response.{whole.status}" and events[-1].response.usage.output_tokens > 0
    with oai.responses.stream(model=MODEL, input="17+25=", temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_text == "42" and final.status == "completed"


def test_tools_are_rendered(oai):
    r = oai.responses.create(model=MODEL, input="17+25=", temperature=0, tools=[ADD])
    assert r.usage.input_tokens == 1 + len("add;\n17+25=")
    assert [item.type for item in r.output] == ["message"]  # auto: this model has no tool-call syntax
    assert r.tools[0].name == "add"
    left_out = oai.responses.create(model=MODEL, input="17+25=", temperature=0, tools=[ADD], tool_choice="none")
    assert left_out.usage.input_tokens == 7


def test_function_call_history_is_rendered(oai):
    r = oai.responses.create(model=MODEL, temperature=0, tools=[ADD], max_output_tokens=4, input=[
        {"role": "user", "content": "1+2="},
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 1, "b": 2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "3"}])
    assert r.usage.input_tokens == 1 + len('add;\n1+2=add{"a": 1, "b": 2}3')


def test_errors_in_openai_shape(oai, tools_server):
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="nope", input="hi")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert "the server keeps no responses" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        oai.responses.create(model=MODEL, input="hi", tools=[ADD], tool_choice={"type": "function", "name": "x"})
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        oai.responses.create(model=MODEL, input="hi", tools=[ADD], tool_choice="required",
                             text={"format": {"type": "json_object"}})
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=MODEL, input=[{"type": "function_call", "call_id": "c", "name": "add",
                                                  "arguments": "[1]"}])
    assert e.value.body["message"].startswith("input: a function_call's arguments must be a JSON object")
    r = httpx.post(f"{tools_server}/v1/responses", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert oai.responses.create(model=MODEL, input="17+25=", temperature=0).output_text == "42"


async def test_a_failure_mid_stream_is_response_failed(client, monkeypatch):
    fail_first_step(monkeypatch)
    r = await client.post("/v1/responses", json={"input": "17+25=", "stream": True})
    events = sse_events(r.text)
    # the message item opens with its first text: a failure before any leaves no item half open
    assert [name for name, _ in events] == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
    monkeypatch.undo()
    r = await client.post("/v1/responses", json={"input": "17+25=", "temperature": 0})
    assert r.json()["output"][0]["content"][0]["text"] == "42"
