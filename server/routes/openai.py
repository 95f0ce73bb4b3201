"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, HTTPException, Request
from sse_starlette import EventSourceResponse

from models.api import Engine, Finished, GenerationParams, OutputConstraint, PromptScores, TokenLogprob
from models.errors import EngineError, InvalidRequestError, UnknownDtypeError
from models.weights.dtypes import FLOATING, STANDARD_QUANTIZATIONS, normalize_dtype
from server.deps import ReadyEngine, SettingsDep, Tenant, cache_scope
from server.errors import engine_error_payload
from server.observe import observed
from server.openai_schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.schemas import ERROR_RESPONSES, STREAM_RESPONSE, usage_body
from server.settings import Settings, check_max_tokens
from server.streaming import collect_unless_disconnected, first_event
from server.structured import NamedToolChoice, output_constraint, template_arguments
from server.tool_schemas import assistant_message, tool_result_message
from server.tool_use import CallReader, ToolUse

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


def split_model_id(model: str | None, dtype: str | None) -> tuple[str | None, str | None]:
    """`name:precision` (`tiny:q4`, `tiny:q4:float16`) -> (name, precision); model names hold no
    colon. The body's dtype must agree when both are given. An id whose suffix is no precision is
    a model name as a whole (so an unknown model: 404)."""
    if model and ":" in model:
        name, _, suffix = model.partition(":")
        try:
            named = normalize_dtype(suffix)
        except UnknownDtypeError:
            return model, dtype
        if dtype and dtype != named:
            raise HTTPException(422, f"model: the id names dtype {named} but the body asks for {dtype}")
        return name, named
    return model, dtype


def sampling_params(body: ChatCompletionRequest | CompletionRequest, settings: Settings, *,
                    max_tokens: int | None, logprobs: int | None, prompt: str | None = None,
                    messages: tuple[dict, ...] | None = None, tenant: str = "",
                    prompt_tokens: tuple[int, ...] | None = None, prompt_logprobs: int = 0,
                    eos_logprob: bool = False, tools: tuple[dict, ...] | None = None,
                    constraint: OutputConstraint | None = None) -> GenerationParams:
    model, dtype = split_model_id(body.model, body.dtype)
    try:
        constraint = constraint or output_constraint(body.response_format, body.structured_outputs)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    if constraint is not None and body.ignore_eos:
        raise HTTPException(400, "ignore_eos cannot be combined with structured output (it ends the text)")
    check_max_tokens(max_tokens, settings)
    stops = body.stop or ()
    seed = None if body.seed is None else body.seed % (2**63)
    bias = tuple((int(k), v) for k, v in (body.logit_bias or {}).items())
    return GenerationParams(
        prompt=prompt, prompt_tokens=prompt_tokens, prompt_logprobs=prompt_logprobs, eos_logprob=eos_logprob,
        messages=messages, model=model, dtype=dtype, max_tokens=max_tokens,
        temperature=body.temperature, top_p=body.top_p, seed=seed, stop=stops, logprobs=logprobs,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logit_bias=bias,
        ignore_eos=body.ignore_eos, cache_scope=cache_scope(tenant, body.cache_salt), tools=tools,
        constraint=constraint)


def template_message(message: ChatMessage) -> dict:
    """A chat message as chat templates read it: tool results and past tool calls included."""
    if message.role == "tool":
        return tool_result_message(message.tool_call_id or "", message.text(), message.name)
    if message.role == "assistant" and message.tool_calls:
        return assistant_message(message.text(), [(c.id, c.function.name, template_arguments(c.function.arguments))
                                                  for c in message.tool_calls])
    return {"role": message.role, "content": message.text()}


def chat_tools(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools and tool choice; an enforced choice cannot be combined with another constraint."""
    choice = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    try:
        tools = ToolUse.of([(t.function.name, t.function.description, t.function.parameters)
                            for t in body.tools or ()], choice, body.parallel_tool_calls is not False)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    if tools is not None and tools.enforced and (body.response_format or body.structured_outputs):
        raise HTTPException(400, "tool_choice required or a named function cannot be combined with "
                                 "response_format or structured_outputs")
    return tools


def variant_id(done: Finished) -> str:
    return f"{done.model}:{done.dtype}"


def warnings_body(done: Finished) -> dict:
    """Extension fields: the variant's float dtype, and warnings when there is something to say."""
    return {"float_dtype": done.float_dtype, **({"warnings": list(done.warnings)} if done.warnings else {})}


# ---- logprobs in the two OpenAI formats --------------------------------------------------------
def completion_logprobs(entries: list[TokenLogprob], offset: int = 0, text: str | None = None) -> dict:
    """The legacy shape; a prompt's first token (echo) has neither a logprob nor alternatives: null. Offsets
    are into `text` where given: a prompt's first token missing from it (BOS) takes no room there."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        if not (text is not None and _context_free(e) and not text.startswith(e.token, at - offset)):
            at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if _context_free(e) else dict(e.top) for e in entries], "text_offset": offsets}


def _context_free(entry: TokenLogprob) -> bool:
    """A prompt's first token: scored (it has an id) but with no context, so no rank."""
    return entry.token_id is not None and entry.rank is None


def vllm_prompt_logprobs(scores: PromptScores) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first: null) its id and the top ids -> logprob,
    rank and text."""
    out: list[dict | None] = []
    for e in scores.tokens:
        if _context_free(e):
            out.append(None)
            continue
        entry = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token}}
        for rank, (token_id, (text, logprob)) in enumerate(zip(e.top_ids, e.top, strict=True), start=1):
            entry.setdefault(str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": text})
        out.append(entry)
    return out


def scored_usage(scores: PromptScores) -> dict:
    """Usage of a request that scored its prompt and generated nothing (max_tokens 0)."""
    n = len(scores.tokens)
    return {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n,
            "prompt_tokens_details": {"cached_tokens": scores.cached_tokens}}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    def item(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


# ---- routes ------------------------------------------------------------------------------------
@router.get("/models", summary="Models and their precision variants, as OpenAI model objects")
async def list_models(engine: ReadyEngine) -> dict:
    """Each model, its float dtypes and standard quantizations, and any other resident variant
    (`tiny:q4:float16`); a resident variant carries its float dtype and bytes."""
    created = int(time.time())
    resident = {f"{v['model']}:{v['dtype']}": v for v in (await engine.memory()).variants}
    data = []
    for name in engine.model_names():
        data.append({"id": name, "object": "model", "created": created, "owned_by": "dtype-serve"})
        ids = [f"{name}:{d}" for d in (*FLOATING, *STANDARD_QUANTIZATIONS)]
        ids += [i for i, v in resident.items() if v["model"] == name and i not in ids]
        for i in ids:
            entry = {"id": i, "object": "model", "created": created, "owned_by": "dtype-serve", "parent": name}
            if i in resident:
                entry.update(resident=True, float_dtype=resident[i]["float_dtype"],
                             total_bytes=resident[i]["total_bytes"])
            data.append(entry)
    return {"object": "list", "data": data}


@router.post("/completions", responses=STREAM_RESPONSE, summary="OpenAI text completions")
async def completions(body: CompletionRequest, request: Request, engine: ReadyEngine, settings: SettingsDep,
                      tenant: Tenant):
    max_tokens = body.max_tokens if body.max_tokens is not None else min(16, settings.max_tokens_limit)
    if max_tokens == 0 and not (body.echo or body.prompt_logprobs is not None):
        raise InvalidRequestError("max_tokens: 0 is allowed only with echo or prompt_logprobs (scoring the prompt)")
    wants_logprobs = body.logprobs is not None
    echo_logprobs = body.echo and wants_logprobs
    scoring = echo_logprobs or body.prompt_logprobs is not None or max_tokens == 0
    params = sampling_params(body, settings, max_tokens=max_tokens, logprobs=body.logprobs,
                             prompt=body.prompt_text(), prompt_tokens=body.prompt_tokens(), tenant=tenant,
                             prompt_logprobs=max(body.logprobs or 0, body.prompt_logprobs or 0),
                             eos_logprob=body.echo)  # lm-eval reads the last entry as the generated token
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # Scored first: its KV goes to the prefix cache, so the generation that follows prefills less.
    scores = await engine.score(params) if scoring else None
    echo_text = ""
    if body.echo:
        echo_text = params.prompt if params.prompt is not None else await engine.detokenize(
            params.model, params.prompt_tokens)
    echo_entries = list(scores.tokens) if echo_logprobs and scores else []
    prompt_logprobs = vllm_prompt_logprobs(scores) if body.prompt_logprobs is not None and scores else None

    def chunk(model: str, text: str, finish: str | None, entries: list[TokenLogprob], offset: int) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": completion_logprobs(entries, offset, text) if wants_logprobs else None}
        if prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs if offset == 0 else None
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

    def usage_chunk(model: str, usage: dict) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                "usage": usage}

    if max_tokens == 0:  # scoring only: nothing is generated
        return _scored_only(scores, body.stream, include_usage, echo_text, echo_entries, chunk, usage_chunk)
    return await _respond(engine, request, params, body.stream, include_usage, rid, created, chunk, usage_chunk,
                          echo_text=echo_text, echo_entries=echo_entries)


def _scored_only(scores: PromptScores, stream: bool, include_usage: bool, echo_text: str,
                 echo_entries: list[TokenLogprob], chunk: Callable, usage_chunk: Callable):
    """The answer of a request with max_tokens 0: the prompt (echo) and its scores, finish_reason `length`."""
    model_id, usage = f"{scores.model}:{scores.dtype}", scored_usage(scores)
    if not stream:
        return {**chunk(model_id, echo_text, "length", echo_entries, 0), "usage": usage,
                "float_dtype": scores.float_dtype}

    async def events() -> AsyncIterator[dict]:
        yield {"data": json.dumps(chunk(model_id, echo_text, "length", echo_entries, 0))}
        if include_usage:
            yield {"data": json.dumps(usage_chunk(model_id, usage))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


@router.post("/chat/completions", responses=STREAM_RESPONSE, summary="OpenAI chat completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: ReadyEngine,
                           settings: SettingsDep, tenant: Tenant):
    messages = tuple(template_message(m) for m in body.messages)
    # vLLM's echo: the reply repeats the last message when it is the assistant's (a continued reply)
    echo_text = messages[-1]["content"] if body.echo and messages[-1]["role"] == "assistant" else ""
    top = body.top_logprobs or 0
    tools = chat_tools(body)
    params = sampling_params(body, settings, max_tokens=body.max_completion_tokens or body.max_tokens,
                             logprobs=top if body.logprobs else None, messages=messages, tenant=tenant,
                             tools=tools.template_tools() if tools else None,
                             constraint=tools.constraint() if tools else None)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first_chunk = [True]

    def chunk(model: str, text: str, finish: str | None, entries: list[TokenLogprob], _: int) -> dict:
        delta: dict = {"content": text} if text or not finish else {}
        if first_chunk[0]:
            delta["role"] = "assistant"
            first_chunk[0] = False
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": chat_logprobs(entries) if body.logprobs else None}]}

    return await _respond(engine, request, params, body.stream, include_usage, rid, created,
                          chunk, lambda model, usage: {"id": rid, "object": "chat.completion.chunk",
                                                       "created": created, "model": model, "choices": [],
                                                       "usage": usage},
                          chat=True, wants_logprobs=bool(body.logprobs), echo_text=echo_text,
                          tools=tools)


async def _respond(engine: Engine, request: Request, params: GenerationParams, stream: bool, include_usage: bool,
                   rid: str, created: int, chunk: Callable, usage_chunk: Callable, *, chat: bool = False,
                   wants_logprobs: bool = False, echo_text: str = "", echo_entries: list[TokenLogprob] | None = None,
                   tools: ToolUse | None = None):
    """Generate and answer; `echo_text` (and its `echo_entries`) come before the generated text; tool calls
    are read from the text where a tool choice is enforced or the model's own syntax is known."""
    events = observed(request, params, engine.generate(params))
    started = await first_event(events)
    echo_entries = echo_entries or []
    reader = tools.reader(engine.tool_syntax(started.model)) if tools else None
    if stream:
        model_id = f"{started.model}:{started.dtype}"
        if reader is not None:
            return EventSourceResponse(_stream_tool_calls(events, chunk, usage_chunk, include_usage, model_id,
                                                          reader), ping=15)
        head = chunk(model_id, echo_text, None, echo_entries, 0) if echo_text or echo_entries else None
        return EventSourceResponse(_stream(events, chunk, usage_chunk, include_usage, model_id, head,
                                           len(echo_text)), ping=15)
    text, entries, done = await collect_unless_disconnected(request, events)
    text, entries = echo_text + text, echo_entries + entries
    if chat:
        message: dict = {"role": "assistant", "content": text}
        finish = done.finish_reason
        if reader is not None:
            text, calls = reader.read(text)
            if calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": calls}
                finish = "tool_calls"
        return {"id": rid, "object": "chat.completion", "created": created, "model": variant_id(done),
                "choices": [{"index": 0, "message": message,
                             "finish_reason": finish,
                             "logprobs": chat_logprobs(entries) if wants_logprobs else None}],
                "usage": usage_body(done), **warnings_body(done)}
    body = chunk(variant_id(done), text, done.finish_reason, entries, 0)
    body["usage"] = usage_body(done)
    body.update(warnings_body(done))
    return body


async def _stream(events: AsyncIterator, chunk: Callable, usage_chunk: Callable,
                  include_usage: bool, model_id: str, head: dict | None = None,
                  offset: int = 0) -> AsyncIterator[dict]:
    """`head` (the echoed prompt) first, then chunks as the tokens come (text offsets from `offset`), a last
    chunk with the finish reason, usage if asked, then [DONE]."""
    if head is not None:
        yield {"data": json.dumps(head)}
    try:
        async for event in events:
            if isinstance(event, Finished):
                yield {"data": json.dumps(chunk(model_id, "", event.finish_reason, [], offset))}
                if include_usage:
                    yield {"data": json.dumps(usage_chunk(model_id, usage_body(event)))}
                break
            yield {"data": json.dumps(chunk(model_id, event.text, None, list(event.logprobs), offset))}
            offset += len(event.text)
    except EngineError as e:
        yield {"data": json.dumps(engine_error_payload(e)[1])}
    finally:
        await events.aclose()
    yield {"data": "[DONE]"}


def _tool_calls_chunk(chunk: Callable, model_id: str, calls: list[dict]) -> dict:
    body = chunk(model_id, "", None, [], 0)
    body["choices"][0]["delta"] = {"role": "assistant", "content": None, "tool_calls": [
        {"index": i, **call} for i, call in enumerate(calls)]}
    return body


async def _stream_tool_calls(events: AsyncIterator, chunk: Callable, usage_chunk: Callable, include_usage: bool,
                             model_id: str, reader: CallReader) -> AsyncIterator[dict]:
    """Text as it comes, up to where a call may begin (all of it held back under an enforced choice); at the
    end the rest of the text, then the calls as one delta (finish reason `tool_calls`)."""
    try:
        async for event in events:
            if not isinstance(event, Finished):
                text = reader.feed(event.text)
                if text:
                    yield {"data": json.dumps(chunk(model_id, text, None, [], 0))}
                continue
            text, calls = reader.finish()
            if text:
                yield {"data": json.dumps(chunk(model_id, text, None, [], 0))}
            if calls:
                yield {"data": json.dumps(_tool_calls_chunk(chunk, model_id, calls))}
            yield {"data": json.dumps(chunk(model_id, "", "tool_calls" if calls else event.finish_reason, [], 0))}
            if include_usage:
                yield {"data": json.dumps(usage_chunk(model_id, usage_body(event)))}
            break
    except EngineError as e:
        yield {"data": json.dumps(engine_error_payload(e)[1])}
    finally:
        await events.aclose()
    yield {"data": "[DONE]"}
