"""POST /generate: the native completion endpoint, JSON or server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from models.api import Finished, GenerationParams, TextDelta
from models.errors import EngineError
from server.deps import ReadyEngine, SettingsDep, Tenant, cache_scope
from server.errors import engine_error_payload
from server.observe import observed
from server.schemas import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    GenerateRequest,
    GenerateResponse,
    Timings,
    UsageBody,
    usage_body,
)
from server.settings import Settings, check_max_tokens
from server.streaming import collect_unless_disconnected, first_event

router = APIRouter(tags=["generate"], responses=ERROR_RESPONSES)


def to_params(body: GenerateRequest, settings: Settings, tenant: str = "") -> GenerationParams:
    """Apply the server's limits and defaults to a request of `tenant`."""
    max_tokens = check_max_tokens(body.max_tokens, settings)
    stops = body.stop or ()
    return GenerationParams(prompt=body.prompt, model=body.model, dtype=body.dtype, max_tokens=max_tokens,
                            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stops,
                            ignore_eos=body.ignore_eos, cache_scope=cache_scope(tenant, body.cache_salt))


def finished_body(text: str, done: Finished) -> GenerateResponse:
    return GenerateResponse(
        text=text, model=done.model, dtype=done.dtype, float_dtype=done.float_dtype, finish_reason=done.finish_reason,
        usage=UsageBody(**usage_body(done)),
        timings=Timings(time_to_first_token_s=round(done.time_to_first_token_s, 6), total_s=round(done.total_s, 6),
                        tokens_per_second=round(done.decode_tokens_per_second, 3)),
        warnings=list(done.warnings))


async def _sse(events: AsyncIterator[TextDelta | Finished]) -> AsyncIterator[dict]:
    """Deltas as {"text"}, then the final response with empty text, then [DONE]."""
    try:
        async for event in events:
            if isinstance(event, Finished):
                yield {"data": finished_body("", event).model_dump_json()}
                break
            yield {"data": json.dumps({"text": event.text})}
    except EngineError as e:
        yield {"event": "error", "data": json.dumps(engine_error_payload(e)[1])}
    finally:
        await events.aclose()
    yield {"data": "[DONE]"}


@router.post("/generate", response_model=GenerateResponse, responses=STREAM_RESPONSE,
             summary="Generate text at the dtype the request names (default: the startup dtype)")
async def generate(body: GenerateRequest, request: Request, engine: ReadyEngine, settings: SettingsDep,
                   tenant: Tenant):
    params = to_params(body, settings, tenant)
    events = observed(request, params, engine.generate(params))
    await first_event(events)  # errors before the first token get a real status
    if body.stream:
        return EventSourceResponse(_sse(events), ping=15)
    text, _, done = await collect_unless_disconnected(request, events)
    return finished_body(text, done)
