"""One JSON error shape for every failure: {"error": {message, type, param, code, status}}.
Messages never carry a stack trace or a server path."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import (
    DtypeRefusedError,
    EngineError,
    EngineUnavailableError,
    GenerationFailedError,
    InvalidRequestError,
    KVBudgetError,
    MemoryBudgetError,
    ModelLoadError,
    ModelNotFoundError,
    PrecisionUnavailableError,
    QueueFullError,
    UnknownDtypeError,
    VariantPinnedError,
)
from server.request_id import request_id
from server.streaming import ClientDisconnected

log = logging.getLogger(__name__)

# domain error -> (status, type)
_ENGINE_ERRORS: list[tuple[type[EngineError], int, str]] = [
    (UnknownDtypeError, 422, "invalid_request_error"),
    (QueueFullError, 429, "rate_limit_exceeded"),
    (DtypeRefusedError, 422, "dtype_refused"),
    (PrecisionUnavailableError, 422, "precision_unavailable"),
    (ModelNotFoundError, 404, "model_not_found"),
    (KVBudgetError, 400, "kv_budget_exceeded"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (VariantPinnedError, 409, "conflict"),
    (ModelLoadError, 500, "model_load_error"),
    (EngineUnavailableError, 503, "service_unavailable"),
    (GenerationFailedError, 503, "generation_failed"),
]


def error_payload(status: int, type_: str, message: str, param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, "status": status}}


def error_response(status: int, type_: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, type_, message, param), status_code=status, headers=headers)


def engine_error_status(error: EngineError) -> tuple[int, str]:
    if isinstance(error, MemoryBudgetError):
        return (503, "memory_budget_busy") if error.retry else (507, "memory_budget_exceeded")
    for cls, status, type_ in _ENGINE_ERRORS:
        if isinstance(error, cls):
            return status, type_
    return 500, "internal_error"


def engine_error_payload(error: EngineError) -> tuple[int, dict[str, Any]]:
    status, type_ = engine_error_status(error)
    payload = error_payload(status, type_, str(error))
    if isinstance(error, MemoryBudgetError | KVBudgetError):
        payload["error"].update(error.details())
    return status, payload


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI schema documents for the paths that `path` matches."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^}]+\\\}", ".+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "literal_error":
            msg = f"{msg}; got {repr(err.get('input'))[:60]}"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_request_error", "request body is not valid JSON")
        if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in ("model_attributes_type", "dict_type")
               for e in errors):
            return error_response(400, "invalid_request_error", "request body must be a JSON object")
        message, param = _validation_message(exc)
        return error_response(422, "invalid_request_error", message, param)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        status, payload = engine_error_payload(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if detail == "There was an error parsing the body":  # FastAPI's words for undecodable bytes
            detail = "request body is not valid JSON (it must be UTF-8 encoded)"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names one route's methods; list every route's on this path
            headers = {"Allow": ", ".join(allowed_methods(app, request.url.path))}
        return error_response(exc.status_code, type_, detail, headers=headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request.scope)
        log.exception("unhandled error (request %s)", rid)
        # Starlette answers this one outside the middleware stack, so the request id is set here
        return error_response(500, "internal_error", "internal server error",
                              headers={"X-Request-Id": rid} if rid else None)
