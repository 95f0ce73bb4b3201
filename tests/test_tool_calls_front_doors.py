"""Tool calls through the Responses and Anthropic Messages front doors, driven by the official `openai` and
`anthropic` packages against a real server on a llama with random weights (tests/conftest.py
`random_tools_server`): an enforced tool choice makes even noise a valid call, so a whole round trip runs."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

MODEL = "random-tools"
WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                  "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TIME_PARAMS = {"type": "object", "additionalProperties": False, "required": ["zone"],
               "properties": {"zone": {"enum": ["UTC", "CET"]}}}
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}


@pytest.fixture(scope="module")
def oai(random_tools_server):
    return openai.OpenAI(base_url=f"{random_tools_server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(random_tools_server):
    return anthropic.Anthropic(base_url=random_tools_server, api_key="none", max_retries=0, timeout=120)


RESPONSES_TOOLS = [{"type": "function", "name": name, "parameters": params} for name, params in PARAMS.items()]
ANTHROPIC_TOOLS = [{"name": name, "input_schema": params} for name, params in PARAMS.items()]


# ---- Responses ----------------------------------------------------------------------------------------------
def test_responses_required_gives_a_valid_call_and_the_round_trip_renders_it(oai):
    first = oai.responses.create(model=MODEL, input="weather in Paris?", tools=RESPONSES_TOOLS,
                                 tool_choice="required", parallel_tool_calls=False, max_output_tokens=200)
    assert first.status == "completed"
    [call] = first.output  # tool calls alone: no message item
    assert call.type == "function_call" and call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
    second = oai.responses.create(model=MODEL, tools=RESPONSES_TOOLS, max_output_tokens=4, input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert [item.type for item in second.output] == ["message"]  # auto: no syntax on this model, text back
    # the history reached the template: the prompt holds the call's arguments and the tool's result
    assert second.usage.input_tokens > first.usage.input_tokens + len("sunny, 21 C")


def test_responses_named_function_streams_its_call_events(oai):
    events = list(oai.responses.create(model=MODEL, input="time?", tools=RESPONSES_TOOLS, stream=True,
                                       tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=100))
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    done = events[-2].item
    assert done.type == "function_call" and done.name == "get_time"
    jsonschema.validate(json.loads(done.arguments), TIME_PARAMS)
    assert events[3].delta == done.arguments and events[-1].response.output[0].arguments == done.arguments
    with oai.responses.stream(model=MODEL, input="time?", tools=RESPONSES_TOOLS,
                              tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=100) as stream:
        final = stream.get_final_response()
    [call] = final.output
    assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), TIME_PARAMS)


def test_responses_parallel_calls_each_validate(oai):
    r = oai.responses.create(model=MODEL, input="both", tools=RESPONSES_TOOLS, tool_choice="required",
                             max_output_tokens=400, temperature=1.0)
    assert r.output and all(item.type == "function_call" for item in r.output)
    for item in r.output:
        jsonschema.validate(json.loads(item.arguments), PARAMS[item.name])


# ---- Anthropic Messages -------------------------------------------------------------------------------------
def test_messages_any_gives_tool_use_and_the_round_trip_renders_it(claude):
    first = claude.messages.create(model=MODEL, max_tokens=200, tools=ANTHROPIC_TOOLS,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   messages=[{"role": "user", "content": "weather in Paris?"}])
    assert first.stop_reason == "tool_use" and first.stop_sequence is None
    [block] = first.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, PARAMS[block.name])
    second = claude.messages.create(model=MODEL, max_tokens=4, tools=ANTHROPIC_TOOLS, messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [block.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny, 21 C"}]}])
    assert [b.type for b in second.content] == ["text"] and second.stop_reason in ("end_turn", "max_tokens")
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens > \
        first.usage.input_tokens + first.usage.cache_read_input_tokens + len("sunny, 21 C")


def test_messages_named_tool_streams_input_json(claude):
    events = list(claude.messages.create(model=MODEL, max_tokens=100, tools=ANTHROPIC_TOOLS, stream=True,
                                         tool_choice={"type": "tool", "name": "get_time"},
                                         messages=[{"role": "user", "content": "time?"}]))
    assert [e.type for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                        "content_block_stop", "message_delta", "message_stop"]
    start, delta = events[1], events[2]
    assert start.index == 0 and start.content_block.type == "tool_use" and start.content_block.name == "get_time"
    assert delta.delta.type == "input_json_delta"
    jsonschema.validate(json.loads(delta.delta.partial_json), TIME_PARAMS)
    assert events[-2].delta.stop_reason == "tool_use"
    with claude.messages.stream(model=MODEL, max_tokens=100, tools=ANTHROPIC_TOOLS,
                                tool_choice={"type": "tool", "name": "get_time"},
                                messages=[{"role": "user", "content": "time?"}]) as stream:
        final = stream.get_final_message()
    [block] = final.content
    assert block.type == "tool_use" and block.name == "get_time"
    jsonschema.validate(block.input, TIME_PARAMS)
