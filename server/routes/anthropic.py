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
from server.tool_schemas import assistant_message, template_tool, tool_result_message


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


def template_tools(body: CountTokensRequest) -> tuple[dict, ...] | None:
    if not body.tools or (body.tool_choice is not None and body.tool_choice.type == "none"):
        return None
    return tuple(template_tool(t.name, t.description, t.input_schema) for t in body.tools)


def stop_reason(done: Finished) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def usage(done: Finished) -> dict:
    """Anthropic counts the prompt tokens read from the cache apart from the other input tokens."""
    u = done.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


@router.post("/messages", responses=STREAM_RESPONSE, summary="Anthropic Messages API")
async def create_message(body: MessagesRequest, request: Request, engine: ReadyEngine, settings: SettingsDep):
    model, dtype = split_model_id(body.model, body.dtype)
    params = GenerationParams(messages=chat_messages(body), tools=template_tools(body), model=model, dtype=dtype,
                              max_tokens=check_max_tokens(body.max_tokens, settings), temperature=body.temperature,
                              top_p=body.top_p, stop=tuple(body.stop_sequences or ()))
    events = observed(request, params, engine.generate(params))
    started = await first_event(events)  # errors before the first token get a real status
    message_id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        start = {"id": message_id, "type": "message", "role": "assistant", "content": [],
                 "model": f"{started.model}:{started.dtype}", "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0}}
        return EventSourceResponse(_stream(events, start), ping=15)
    text, _, done = await collect_unless_disconnected(request, events)
    return {"id": message_id, "type": "message", "role": "assistant", "model": variant_id(done),
            "content": [{"type": "text", "text": text}], "stop_reason": stop_reason(done),
            "stop_sequence": done.stop_sequence, "usage": usage(done), **warnings_body(done)}


@router.post("/messages/count_tokens", summary="Anthropic's token count of a Messages request")
async def count_tokens(body: CountTokensRequest, engine: ReadyEngine) -> dict:
    model, dtype = split_model_id(body.model, None)
    done = await engine.tokenize(TokenizeParams(model=model, dtype=dtype, messages=chat_messages(body),
                                                tools=template_tools(body)))
    return {"input_tokens": len(done.tokens)}


def _event(type_: str, **fields) -> dict:
    return {"event": type_, "data": json.dumps({"type": type_, **fields})}


async def _stream(events: AsyncIterator, start: dict) -> AsyncIterator[dict]:
    """Anthropic's event sequence for one text block; an `error` event if generation fails."""
    yield _event("message_start", message=start)
    yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    try:
        async for event in events:
            if isinstance(event, Finished):
                yield _event("content_block_stop", index=0)
                yield _event("message_delta", delta={"stop_reason": stop_reason(event),
                                                     "stop_sequence": event.stop_sequence}, usage=usage(event))
                yield _event("message_stop")
                break
            if event.text:
                yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": event.text})
    except EngineError as e:
        status, payload = engine_error_payload(e)
        yield {"event": "error", "data": json.dumps(anthropic_error(status, payload["error"]["message"])[1])}
    finally:
        await events.aclose()
