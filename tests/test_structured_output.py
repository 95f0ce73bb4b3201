"""Structured output (response_format, structured_outputs) and enforced tool calls, through real servers:
the bundled model and a llama with random weights, real MLX, HTTP and clients."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from models.api import OutputConstraint
from models.decode.constraints import compile_constraint
from models.errors import InvalidRequestError
from tests.conftest import BUNDLED as BUNDLED_PATH
from tests.test_registry import app_client, close

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet", "scores"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "none"]},
                         "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                    "maxItems": 3}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the forecast for a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


async def test_50_concurrent_schema_requests_all_parse_and_validate(live_server):
    """Sampled (seeded, temperature 1) so that the texts differ; more requests than batch rows, so rows
    join and leave the batch while others decode under their grammars."""
    async with httpx.AsyncClient(base_url=live_server, timeout=300) as client:
        async def one(i: int) -> dict:
            body = {"messages": [{"role": "user", "content": f"{i}+{i}="}], "max_tokens": 120, "seed": i,
                    "temperature": 1.0, "response_format": schema_format(PERSON)}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        choices = await asyncio.gather(*(one(i) for i in range(50)))
    texts = []
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        value = json.loads(choice["message"]["content"])
        jsonschema.validate(value, PERSON)
        texts.append(choice["message"]["content"])
    assert len(set(texts)) > 10  # really sampled: not one text repeated


async def test_constrained_rows_share_the_batch_and_leave_greedy_neighbours_unchanged():
    app, ctx, client = await app_client(max_batch_size=8, max_queue=8)
    engine = app.state.engine
    try:
        plain = [{"prompt": p, "model": "tiny-arith:float32", "max_tokens": 16, "temperature": 0}
                 for p in ("12+7=", "3+45=", "The dog")]
        constrained = [{"prompt": f"{i}+1=", "model": "tiny-arith:float32", "max_tokens": 80, "temperature": 0,
                        "response_format": schema_format(PERSON)} for i in range(3)]

        async def post(body: dict) -> dict:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        alone = [(await post(b))["choices"][0]["text"] for b in plain]
        steps = engine.stats.decode_steps
        together = await asyncio.gather(*(post(b) for b in constrained + plain))
        results = [r["choices"][0] for r in together]
        assert [r["text"] for r in results[3:]] == alone
        for result in results[:3]:
            jsonschema.validate(json.loads(result["text"]), PERSON)
        generated = sum(r["usage"]["completion_tokens"] for r in together)
        # one step decodes every row: far fewer steps than tokens (one request at a time: one step each)
        assert engine.stats.decode_steps - steps < generated / 2
    finally:
        await close(ctx, client)


async def test_regex_choice_grammar_and_json_object(client):
    async def text(**fields) -> str:
        r = await client.post("/v1/completions", json={"prompt": "7+8=", "max_tokens": 40, **fields})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        return r.json()["choices"][0]["text"]

    pattern = "[0-9]{1,3} (apples|pears)"
    assert re.fullmatch(pattern, await text(structured_outputs={"regex": pattern}))
    assert await text(structured_outputs={"choice": ["yes", "no", "maybe so"]}) in ("yes", "no", "maybe so")
    grammar = 'start: "sum=" NUM ";"\nNUM: /[0-9]{1,4}/'
    assert re.fullmatch(r"sum=[0-9]{1,4};", await text(structured_outputs={"grammar": grammar}))
    assert isinstance(json.loads(await text(response_format={"type": "json_object"}, max_tokens=200,
                                            temperature=1.0, seed=0)), dict)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 999}}, "required": ["n"],
              "additionalProperties": False}
    value = json.loads(await text(structured_outputs={"json": schema}))
    jsonschema.validate(value, schema)


async def test_a_lone_streamed_request_is_constrained_too(client):
    """The lone-stream path (no batch), streamed: its processor sees each step's input token."""
    body = {"messages": [{"role": "user", "content": "2+2="}], "max_tokens": 100, "stream": True,
            "response_format": schema_format(PERSON)}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_grammar_too_short_for_max_tokens_finishes_with_length(client):
    r = await client.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 3,
                                                   "structured_outputs": {"regex": "a{10}"}})
    assert r.status_code == 200
    assert r.json()["choices"][0] == {**r.json()["choices"][0], "text": "aaa", "finish_reason": "length"}


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
    {"structured_outputs": {"regex": "(unclosed"}},
    {"structured_outputs": {"grammar": "start: missing_rule"}},
])
async def test_bad_schemas_and_grammars_are_400s_and_the_model_keeps_serving(client, fields):
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["status"] == 400
    assert "Traceback" not in error["message"] and "/" not in error["message"].split(":")[0]
    ok = await client.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 4})
    assert ok.status_code == 200


@pytest.mark.parametrize("fields, status", [
    ({"response_format": {"type": "json_schema"}}, 400),  # no schema
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, 400),  # two at once
    ({"structured_outputs": {}}, 400),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, 400),
    ({"response_format": {"type": "xml"}}, 422),
    ({"structured_outputs": {"choice": []}}, 422),
])
async def test_malformed_structured_fields_are_refused(client, fields, status):
    r = await client.post("/v1/completions", json={"prompt": "1+1=", **fields})
    assert r.status_code == status, r.text
    assert r.json()["error"]["status"] == status


def test_compile_refuses_what_llguidance_cannot_compile(tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from tests.conftest import BUNDLED

    tokenizer = load_tokenizer(BUNDLED)
    with pytest.raises(InvalidRequestError, match="json_schema"):
        compile_constraint(tokenizer, OutputConstraint("json_schema", '{"type": "object", "properties": 3}'))
    processor = compile_constraint(tokenizer, OutputConstraint("choice", '["ab"]'))
    import mlx.core as mx

    first = processor(mx.array([1, 5]), mx.zeros((1, 100)))  # the prompt's last token is not consumed
    assert [i for i, v in enumerate(first[0].tolist()) if v == 0] == tokenizer.encode("a", add_special_tokens=False)


# ---- tool calls ---------------------------------------------------------------------------------------------
def test_a_tool_round_trip_through_the_openai_sdk_on_a_random_model(random_tools_server):
    import openai

    client = openai.OpenAI(base_url=f"{random_tools_server}/v1", api_key="none")
    messages = [{"role": "user", "content": "weather in Paris?"}]
    first = client.chat.completions.create(model="random-tools", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=200)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model="random-tools", messages=messages, tools=[WEATHER, TIME],
                                            max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.tool_calls is None
    # the history reached the template: the prompt holds the call's arguments and the tool's result
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len("sunny, 21 C")


def test_a_named_function_streams_as_tool_call_deltas(random_tools_server):
    import openai

    client = openai.OpenAI(base_url=f"{random_tools_server}/v1", api_key="none")
    stream = client.chat.completions.create(
        model="random-tools", messages=[{"role": "user", "content": "time?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=100, stream=True)
    chunks = list(stream)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function.name] == ["get_time"]
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_with_parallel_calls_gives_a_list_of_valid_calls(random_tools_server):
    r = httpx.post(f"{random_tools_server}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "both"}], "tools": [WEATHER, TIME], "tool_choice": "required",
        "max_tokens": 400, "temperature": 1.0, "seed": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"]
    for call in choice["message"]["tool_calls"]:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


@pytest.mark.parametrize("fields, status", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, 400),
    ({"tool_choice": "sometimes"}, 422),
])
async def test_bad_tool_choices(client, fields, status):
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "tools": [WEATHER], **fields})
    assert r.status_code == status, r.text
    assert r.json()["error"]["status"] == status


# ---- the model's own tool-call syntax (tool_choice auto) ----------------------------------------------------
JSON_TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{% for tool in tools %}<tool>{{ tool.function.name }}</tool>{% endfor %}{% endif %}"
    "{% for message in messages %}{{ message['content'] or '' }}{% if message.tool_calls is defined %}"
    "{% for tool_call in message.tool_calls %}{% set tool_call = tool_call.function %}"
    "<tool_call>{\"name\": \"{{ tool_call.name }}\"}</tool_call>{% endfor %}{% endif %}{% endfor %}")
FORCED_CALL = 'Hi<tool_call>{"name": "get_time", "arguments": {"zone": "(UTC|CET)"}}</tool_call>'


@pytest.fixture(scope="module")
def json_tools_model(tmp_path_factory):
    """A random llama whose chat template mlx-lm reads as the `json_tools` family (<tool_call>{json}</tool_call>)."""
    from models.testing.synthetic import BUNDLED, llama_config, make_llama_checkpoint

    source = tmp_path_factory.mktemp("tokenizer")
    for name in ("config.json", "tokenizer.json", "special_tokens_map.json"):
        (source / name).write_bytes((BUNDLED / name).read_bytes())
    config = json.loads((BUNDLED / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": JSON_TOOLS_TEMPLATE}))
    return make_llama_checkpoint(tmp_path_factory.mktemp("models") / "json-tools",
                                 llama_config(hidden=64, layers=2, vocab=100, context=1024), tokenizer_from=source)


def test_the_model_s_tool_call_syntax_is_split_from_the_text(json_tools_model):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from models.text.tool_calls import ToolCallStream, ToolCallSyntax

    syntax = ToolCallSyntax.of(load_tokenizer(json_tools_model))
    assert (syntax.start, syntax.end) == ("<tool_call>", "</tool_call>")
    text = 'Sure. <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call> done'
    assert syntax.split(text, [TIME]) == ("Sure.  done", [("get_time", '{"zone": "UTC"}')])
    cut = 'Sure. <tool_call>{"name": "get_ti'  # ended by max_tokens: no call, the text stays
    assert syntax.split(cut, [TIME]) == (cut, [])
    stream = ToolCallStream(syntax, [TIME])
    sent = [stream.feed(piece) for piece in ("Sure. <to", "ol_call>{\"name\": \"get_time\", ",
                                             "\"arguments\": {}}</tool_call>")]
    assert sent == ["Sure. ", "", ""]  # "<to" may open a marker: held back
    assert stream.finish() == ("", [("get_time", "{}")])
    assert ToolCallSyntax.of(load_tokenizer(BUNDLED_PATH)) is None


async def test_tool_choice_auto_returns_the_calls_the_model_writes(json_tools_model):
    """The model is made to write the json_tools syntax (a regex constraint), as a trained one would."""
    app, ctx, client = await app_client(model_dirs=(json_tools_model.parent,))
    try:
        body = {"model": "json-tools", "messages": [{"role": "user", "content": "time?"}], "tools": [TIME],
                "max_tokens": 120,
                "structured_outputs": {"regex": re.escape(FORCED_CALL).replace(r"\(UTC\|CET\)", "(UTC|CET)")}}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Hi"
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_time"
        assert json.loads(call["function"]["arguments"])["zone"] in ("UTC", "CET")
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(line[6:]) async for line in s.aiter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        calls = [t for c in chunks for t in c["choices"][0]["delta"].get("tool_calls") or ()]
        assert text == "Hi" and [t["function"]["name"] for t in calls] == ["get_time"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        plain = await client.post("/v1/chat/completions", json={**body, "tool_choice": "none",
                                                               "structured_outputs": None})
        assert plain.status_code == 200 and plain.json()["choices"][0]["message"].get("tool_calls") is None
    finally:
        await close(ctx, client)


async def test_responses_text_format_json_schema(client):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = await client.post("/v1/responses", json={"input": "3+4=", "max_output_tokens": 120, "text": {"format": fmt}})
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(json.loads(body["output"][0]["content"][0]["text"]), PERSON)
    assert body["text"]["format"]["name"] == "person"
    bad = await client.post("/v1/responses", json={"input": "3+4=", "text": {"format": {"type": "json_schema"}}})
    assert bad.status_code == 400
