"""POST /v1/responses: OpenAI's Responses API as a thin adapter over the engine (stateless): text, structured
output and function calls."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, HTTPException, Request
from sse_starlette import EventSourceResponse

from models.api import Finished, GenerationParams
from models.errors import EngineError
from server.deps import ReadyEngine, SettingsDep
from server.errors import engine_error_status
from server.observe import observed
from server.responses_schemas import FunctionCallItem, FunctionCallOutputItem, NamedFunctionChoice, ResponsesRequest
from server.routes.openai import split_model_id, variant_id, warnings_body
from server.schemas import ERROR_RESPONSES, STREAM_RESPONSE
from server.settings import Settings, check_max_tokens
from server.streaming import collect_unless_disconnected, first_event
from server.structured import output_constraint
from server.tool_schemas import assistant_message, tool_result_message
from server.tool_use import CallReader, ToolUse

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


def tool_use(body: ResponsesRequest) -> ToolUse | None:
    """The request's tools and tool choice (a named function given as `{"type": "function", "name": ...}`)."""
    choice = body.tool_choice.name if isinstance(body.tool_choice, NamedFunctionChoice) else body.tool_choice
    try:
        return ToolUse.of([(t.name, t.description, t.parameters) for t in body.tools or ()], choice,
                          body.parallel_tool_calls is not False)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


def generation_params(body: ResponsesRequest, settings: Settings, tools: ToolUse | None) -> GenerationParams:
    model, dtype = split_model_id(body.model, body.dtype)
    try:
        text_format = body.text.format.as_response_format() if body.text and body.text.format else None
        constraint = output_constraint(text_format, None)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    if tools is not None and tools.enforced:
        if constraint is not None:
            raise HTTPException(400, "tool_choice required or a named function cannot be combined with "
                                     "text.format json_object or json_schema")
        constraint = tools.constraint()
    return GenerationParams(messages=input_messages(body), tools=tools.template_tools() if tools else None,
                            model=model, dtype=dtype,
                            max_tokens=check_max_tokens(body.max_output_tokens, settings, "max_output_tokens"),
                            temperature=body.temperature, top_p=body.top_p,
                            constraint=constraint)


class ResponseBuilder:
    """The Response object and its streamed events, for one request: a message item for the text (if any),
    then a function_call item per tool call."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body, self.model = body, model
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.sequence = 0

    def message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != \
            "in_progress" else []
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def function_call(call: dict, status: str = "completed") -> dict:
        """An OpenAI `tool_calls` entry as a Responses function_call item."""
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"] if status == "completed" else "", "status": status}

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

    def status(self, done: Finished, calls: list[dict]) -> str:
        return "incomplete" if done.finish_reason == "length" and not calls else "completed"

    def finished(self, text: str, done: Finished, calls: list[dict] | None = None) -> dict:
        calls = calls or []
        status = self.status(done, calls)
        output = [self.message(text, "completed" if status == "completed" else "incomplete")] \
            if text or not calls else []
        return self.response(status, output + [self.function_call(c) for c in calls], done)

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


@router.post("/responses", responses=STREAM_RESPONSE, summary="OpenAI Responses API (stateless)")
async def create_response(body: ResponsesRequest, request: Request, engine: ReadyEngine, settings: SettingsDep):
    tools = tool_use(body)
    params = generation_params(body, settings, tools)
    events = observed(request, params, engine.generate(params))
    started = await first_event(events)  # errors before the first token get a real status
    builder = ResponseBuilder(body, f"{started.model}:{started.dtype}")
    reader = tools.reader(engine.tool_syntax(started.model)) if tools else None
    if body.stream:
        return EventSourceResponse(_stream(events, builder, reader), ping=15)
    text, _, done = await collect_unless_disconnected(request, events)
    calls: list[dict] = []
    if reader is not None:
        text, calls = reader.read(text)
    return builder.finished(text, done, calls)


class _MessageEvents:
    """The streamed events of the message item, opened at its first text (a reply of tool calls alone has none)."""

    def __init__(self, b: ResponseBuilder) -> None:
        self.b, self.open, self.parts = b, False, []
        self.where = {"item_id": b.item_id, "output_index": 0, "content_index": 0}
        self.part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}

    def opened(self) -> Iterator[dict]:
        """The item's opening events, once."""
        if not self.open:
            self.open = True
            yield self.b.event("response.output_item.added", output_index=0, item=self.b.message("", "in_progress"))
            yield self.b.event("response.content_part.added", **self.where, part=self.part)

    def delta(self, text: str) -> Iterator[dict]:
        if text:
            yield from self.opened()
            self.parts.append(text)
            yield self.b.event("response.output_text.delta", **self.where, delta=text, logprobs=[])

    def done(self, item: dict) -> Iterator[dict]:
        text = "".join(self.parts)
        yield self.b.event("response.output_text.done", **self.where, text=text, logprobs=[])
        yield self.b.event("response.content_part.done", **self.where, part={**self.part, "text": text})
        yield self.b.event("response.output_item.done", output_index=0, item=item)


async def _stream(events: AsyncIterator, b: ResponseBuilder, reader: CallReader | None) -> AsyncIterator[dict]:
    """OpenAI's event sequence: a message item with one text part (unless the reply is tool calls alone), then
    each function_call item with its arguments; `response.failed` if generation fails."""
    yield b.event("response.created", response=b.response("in_progress", []))
    yield b.event("response.in_progress", response=b.response("in_progress", []))
    message = _MessageEvents(b)
    try:
        async for event in events:
            if isinstance(event, Finished):
                calls: list[dict] = []
                if reader is not None:
                    rest, calls = reader.finish()
                    for e in message.delta(rest):
                        yield e
                final = b.finished("".join(message.parts), event, calls)
                with_message = message.open or not calls  # as `finished` decides
                if with_message:
                    for e in [*message.opened(), *message.done(final["output"][0])]:
                        yield e
                for e in _function_call_events(b, final["output"][1 if with_message else 0:], with_message):
                    yield e
                yield b.event(f"response.{final['status']}", response=final)
                break
            text = reader.feed(event.text) if reader is not None else event.text
            for e in message.delta(text):
                yield e
    except EngineError as e:
        _, type_ = engine_error_status(e)
        yield b.event("response.failed", response=b.response("failed", [], error={"code": type_, "message": str(e)}))
    finally:
        await events.aclose()


def _function_call_events(b: ResponseBuilder, items: list[dict], after_message: bool) -> Iterator[dict]:
    """Each function_call item: added, its arguments (one delta), done."""
    for i, item in enumerate(items, start=1 if after_message else 0):
        yield b.event("response.output_item.added", output_index=i, item={**item, "arguments": "",
                                                                          "status": "in_progress"})
        yield b.event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                      delta=item["arguments"])
        yield b.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                      arguments=item["arguments"])
        yield b.event("response.output_item.done", output_index=i, item=item)
