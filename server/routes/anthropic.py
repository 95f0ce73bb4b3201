"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API as a thin adapter over the
engine, with its errors in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sse_starlette import EventSourceResponse

from models.api import Finished, GenerationParams, TokenizeParams
from models.errors import EngineError
from server.anthropic_schemas import (
    AnthropicErrorBody,
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ToolUseBlock,
    anthropic_error,
)
from server.deps import ReadyEngine, SettingsDep
from server.errors import engine_error_payload
from server.observe import observed
from server.routes.openai import split_model_id, variant_id, warnings_body
from server.schemas import STREAM_RESPONSE
from server.settings import check_max_tokens
from server.streaming import ClientDisconnected, collect_unless_disconnected, first_event
from server.tool_schemas import assistant_message, tool_result_message
from server.tool_use import CallReader, ToolUse


async def _app_error_response(request: Request, exc: Exception) -> Response:
    """The response the app's own error handlers give `exc` (one message for every front door)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return await handlers[cls](request, exc)
    raise exc


class AnthropicRoute(APIRoute):
    """A route whose errors, validation included, come in Anthropic's shape and statuses."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnected:
                raise
            except Exception as exc:
                response = await _app_error_response(request, exc)
                message = json.loads(response.body)["error"]["message"]
                status, body = anthropic_error(response.status_code, message)
                keep = {k: v for k, v in response.headers.items() if k in ("retry-after", "allow")}
                return JSONResponse(body, status_code=status, headers=keep)

        return route


router = APIRouter(prefix="/v1", tags=["anthropic"], route_class=AnthropicRoute,
                   responses={s: {"model": AnthropicErrorBody} for s in (400, 401, 404, 413, 429, 500, 503, 507)})


def chat_messages(body: CountTokensRequest) -> tuple[dict, ...]:
    """System and messages as chat-template messages: tool_use blocks become the assistant's tool calls,
    tool_result blocks `tool` messages."""
    system = body.system_text()
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    for message in body.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        texts, calls, results = [], [], []
        for block in message.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append((block.id, block.name, block.input))
            else:
                results.append(tool_result_message(block.tool_use_id, block.text()))
        if (calls and message.role != "assistant") or (results and message.role != "user"):
            raise HTTPException(400, "messages: tool_use blocks belong in assistant messages, tool_result "
                                     "blocks in user messages")
        if message.role == "assistant":
            messages.append(assistant_message("".join(texts), calls))
            continue
        messages += results
        if texts or not results:
            messages.append({"role": "user", "content": "".join(texts)})
    return tuple(messages)


def tool_use(body: CountTokensRequest) -> ToolUse | None:
    """The request's tools and tool choice: `any` is OpenAI's `required`, `tool` names one."""
    choice = body.tool_choice
    if choice is not None and choice.type == "tool" and choice.name is None:
        raise HTTPException(400, "tool_choice: type `tool` needs the tool's `name`")
    names = {None: None, "auto": "auto", "none": "none", "any": "required"}
    try:
        return ToolUse.of([(t.name, t.description, t.input_schema) for t in body.tools or ()],
                          choice.name if choice is not None and choice.type == "tool"
                          else names[choice.type if choice is not None else None],
                          not (choice is not None and choice.disable_parallel_tool_use))
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


def stop_reason(done: Finished, calls: list[dict] | None = None) -> str:
    if calls:
        return "tool_use"
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def usage(done: Finished) -> dict:
    """Anthropic counts the prompt tokens read from the cache apart from the other input tokens."""
    u = done.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


def tool_use_block(call: dict) -> dict:
    """An OpenAI `tool_calls` entry as an Anthropic tool_use block."""
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def content(text: str, calls: list[dict]) -> list[dict]:
    """A text block (unless the reply is tool calls alone), then a tool_use block per call."""
    return ([{"type": "text", "text": text}] if text or not calls else []) + [tool_use_block(c) for c in calls]


@router.post("/messages", responses=STREAM_RESPONSE, summary="Anthropic Messages API")
async def create_message(body: MessagesRequest, request: Request, engine: ReadyEngine, settings: SettingsDep):
    model, dtype = split_model_id(body.model, body.dtype)
    tools = tool_use(body)
    params = GenerationParams(messages=chat_messages(body), tools=tools.template_tools() if tools else None,
                              model=model, dtype=dtype, max_tokens=check_max_tokens(body.max_tokens, settings),
                              temperature=body.temperature, top_p=body.top_p, stop=tuple(body.stop_sequences or ()),
                              constraint=tools.constraint() if tools else None)
    events = observed(request, params, engine.generate(params))
    started = await first_event(events)  # errors before the first token get a real status
    reader = tools.reader(engine.tool_syntax(started.model)) if tools else None
    message_id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        start = {"id": message_id, "type": "message", "role": "assistant", "content": [],
                 "model": f"{started.model}:{started.dtype}", "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0}}
        return EventSourceResponse(_stream(events, start, reader), ping=15)
    text, _, done = await collect_unless_disconnected(request, events)
    calls: list[dict] = []
    if reader is not None:
        text, calls = reader.read(text)
    return {"id": message_id, "type": "message", "role": "assistant", "model": variant_id(done),
            "content": content(text, calls), "stop_reason": stop_reason(done, calls),
            "stop_sequence": None if calls else done.stop_sequence, "usage": usage(done), **warnings_body(done)}


def _template_tools(body: CountTokensRequest) -> tuple[dict, ...] | None:
    tools = tool_use(body)
    return tools.template_tools() if tools else None


@router.post("/messages/count_tokens", summary="Anthropic's token count of a Messages request")
async def count_tokens(body: CountTokensRequest, engine: ReadyEngine) -> dict:
    model, dtype = split_model_id(body.model, None)
    done = await engine.tokenize(TokenizeParams(model=model, dtype=dtype, messages=chat_messages(body),
                                                tools=_template_tools(body)))
    return {"input_tokens": len(done.tokens)}


def _event(type_: str, **fields) -> dict:
    return {"event": type_, "data": json.dumps({"type": type_, **fields})}


async def _stream(events: AsyncIterator, start: dict, reader: CallReader | None) -> AsyncIterator[dict]:
    """Anthropic's event sequence: a text block (opened at the first text; empty if the reply has neither
    text nor calls), then a tool_use block per call; an `error` event if generation fails."""
    yield _event("message_start", message=start)
    index, text_open = 0, False
    try:
        async for event in events:
            if isinstance(event, Finished):
                calls: list[dict] = []
                if reader is not None:
                    rest, calls = reader.finish()
                    if rest and not text_open:
                        text_open = True
                        yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                    if rest:
                        yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": rest})
                if not text_open and not calls:
                    text_open = True
                    yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                if text_open:
                    yield _event("content_block_stop", index=0)
                    index = 1
                for i, call in enumerate(calls, start=index):
                    block = tool_use_block(call)
                    yield _event("content_block_start", index=i, content_block={**block, "input": {}})
                    yield _event("content_block_delta", index=i, delta={
                        "type": "input_json_delta", "partial_json": call["function"]["arguments"]})
                    yield _event("content_block_stop", index=i)
                yield _event("message_delta", delta={"stop_reason": stop_reason(event, calls),
                                                     "stop_sequence": None if calls else event.stop_sequence},
                             usage=usage(event))
                yield _event("message_stop")
                break
            text = reader.feed(event.text) if reader is not None else event.text
            if text:
                if not text_open:
                    text_open = True
                    yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})
    except EngineError as e:
        status, payload = engine_error_payload(e)
        yield {"event": "error", "data": json.dumps(anthropic_error(status, payload["error"]["message"])[1])}
    finally:
        await events.aclose()
