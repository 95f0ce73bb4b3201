"""POST /v1/responses: OpenAI's Responses API as a thin adapter over the engine (stateless, text output)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from sse_starlette import EventSourceResponse

from models.api import Finished, GenerationParams
from models.errors import EngineError
from server.deps import ReadyEngine, SettingsDep
from server.errors import engine_error_status
from server.observe import observed
from server.responses_schemas import FunctionCallItem, FunctionCallOutputItem, ResponsesRequest
from server.routes.openai import split_model_id, variant_id, warnings_body
from server.schemas import ERROR_RESPONSES, STREAM_RESPONSE
from server.settings import Settings, check_max_tokens
from server.streaming import collect_unless_disconnected, first_event
from server.structured import output_constraint
from server.tool_schemas import assistant_message, template_tool, tool_result_message

router = APIRouter(prefix="/v1", tags=["responses"], responses=ERROR_RESPONSES)


def input_messages(body: ResponsesRequest) -> tuple[dict, ...]:
    """The instructions and input items as chat-template messages; consecutive tool calls form one turn."""
    messages: list[dict] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [body.input] if isinstance(body.input, str) else body.input
    names: dict[str, str] = {}  # call id -> tool name, for the results
    for item in items:
        if isinstance(item, str):
            messages.append({"role": "user", "content": item})
        elif isinstance(item, FunctionCallItem):
            call = (item.call_id, item.name, call_arguments(item.arguments))
            names[item.call_id] = item.name
            if messages and messages[-1]["role"] == "assistant":
                last = messages.pop()
                messages.append(assistant_message(last["content"], [*_calls(last), call]))
            else:
                messages.append(assistant_message("", [call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(tool_result_message(item.call_id, item.text(), names.get(item.call_id)))
        else:  # templates know system, not developer
            messages.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
    return tuple(messages)


def _calls(message: dict) -> list[tuple[str, str, dict]]:
    return [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", ())]


def call_arguments(encoded: str) -> dict:
    """A function call's arguments, decoded: chat templates take them as an object."""
    try:
        value = json.loads(encoded)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise HTTPException(400, "input: a function_call's arguments must be a JSON object, encoded as a string")
    return value


def generation_params(body: ResponsesRequest, settings: Settings) -> GenerationParams:
    model, dtype = split_model_id(body.model, body.dtype)
    tools = None
    if body.tools and body.tool_choice != "none":
        tools = tuple(template_tool(t.name, t.description, t.parameters) for t in body.tools)
    try:
        text_format = body.text.format.as_response_format() if body.text and body.text.format else None
        constraint = output_constraint(text_format, None)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    return GenerationParams(messages=input_messages(body), tools=tools, model=model, dtype=dtype,
                            max_tokens=check_max_tokens(body.max_output_tokens, settings, "max_output_tokens"),
                            temperature=body.temperature, top_p=body.top_p,
                            constraint=constraint)


class ResponseBuilder:
    """The Response object and its streamed events, for one request."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body, self.model = body, model
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.sequence = 0

    def message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != \
            "in_progress" else []
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def response(self, status: str, output: list[dict], done: Finished | None = None,
                 error: dict | None = None) -> dict:
        incomplete = status == "incomplete"
        body = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "model": variant_id(done) if done else self.model, "output": output, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                **self.body.echo(), "usage": usage(done) if done else None}
        if done:
            body.update(warnings_body(done))
        return body

    def finished(self, text: str, done: Finished) -> dict:
        status = "incomplete" if done.finish_reason == "length" else "completed"
        return self.response(status, [self.message(text, "completed" if status == "completed" else "incomplete")],
                             done)

    def event(self, type_: str, **fields) -> dict:
        """One server-sent event: its name, and the data that repeats it with a sequence number."""
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return {"event": type_, "data": json.dumps(data)}


def usage(done: Finished) -> dict:
    u = done.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


@router.post("/responses", responses=STREAM_RESPONSE, summary="OpenAI Responses API (stateless, text output)")
async def create_response(body: ResponsesRequest, request: Request, engine: ReadyEngine, settings: SettingsDep):
    params = generation_params(body, settings)
    events = observed(request, params, engine.generate(params))
    started = await first_event(events)  # errors before the first token get a real status
    builder = ResponseBuilder(body, f"{started.model}:{started.dtype}")
    if body.stream:
        return EventSourceResponse(_stream(events, builder), ping=15)
    text, _, done = await collect_unless_disconnected(request, events)
    return builder.finished(text, done)


async def _stream(events: AsyncIterator, b: ResponseBuilder) -> AsyncIterator[dict]:
    """OpenAI's event sequence for one message with one text part; `response.failed` if generation fails."""
    where = {"item_id": b.item_id, "output_index": 0, "content_index": 0}
    yield b.event("response.created", response=b.response("in_progress", []))
    yield b.event("response.in_progress", response=b.response("in_progress", []))
    yield b.event("response.output_item.added", output_index=0, item=b.message("", "in_progress"))
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield b.event("response.content_part.added", **where, part=part)
    parts: list[str] = []
    try:
        async for event in events:
            if isinstance(event, Finished):
                text = "".join(parts)
                final = b.finished(text, event)
                yield b.event("response.output_text.done", **where, text=text, logprobs=[])
                yield b.event("response.content_part.done", **where, part={**part, "text": text})
                yield b.event("response.output_item.done", output_index=0, item=final["output"][0])
                yield b.event(f"response.{final['status']}", response=final)
                break
            if event.text:
                parts.append(event.text)
                yield b.event("response.output_text.delta", **where, delta=event.text, logprobs=[])
    except EngineError as e:
        _, type_ = engine_error_status(e)
        yield b.event("response.failed", response=b.response("failed", [], error={"code": type_, "message": str(e)}))
    finally:
        await events.aclose()
