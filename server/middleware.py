"""Pure ASGI middleware: CORS, API keys and request body limits, before any routing or parsing."""

from __future__ import annotations

import hmac
import json
import logging

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.anthropic_schemas import anthropic_error, is_anthropic_path

log = logging.getLogger(__name__)

# Exact raw paths that need no key: liveness and readiness probes (app.py adds the console's static page).
OPEN_PATHS = frozenset({"/health", "/health/ready"})


async def send_error(send: Send, status: int, type_: str, message: str, headers: list | None = None,
                     scope: Scope | None = None) -> None:
    """The error in the shape of the front door the request came to: Anthropic's, or everyone else's."""
    if scope is not None and is_anthropic_path(scope.get("path", "")):
        status, payload = anthropic_error(status, message)
    else:
        payload = {"error": {"message": message, "type": type_, "param": None, "code": None, "status": status}}
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in our JSON error shape.

    Installed outside the API-key check: browsers send preflights without credentials, so they are
    answered from the CORS settings alone; the actual request still needs its key.
    """

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        message = response.body.decode() + " (see --cors-origins)"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": None, "status": response.status_code}},
                            status_code=response.status_code, headers=headers)


class ApiKeyMiddleware:
    """Every path but `open_paths` (default: the probes) needs `Authorization: Bearer <key>`, compared in
    constant time.

    The check runs on the raw path before routing, so no spelling of a path (`//v1`, `/V1`,
    `%2F`) reaches a route without a key; only the exact open paths are open.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.open_paths = open_paths

    def _authorized(self, scope: Scope) -> bool:
        supplied = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = token.strip()
                break
        ok = False
        for key in self.keys:  # compare against every key, so timing says nothing about which
            ok |= hmac.compare_digest(supplied, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path")
        path = raw.split(b"?", 1)[0].decode("latin-1") if raw else scope.get("path", "")
        if path in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "authentication_error", "a valid API key is required "
                         "(Authorization: Bearer <key>)", [(b"www-authenticate", b"Bearer")], scope)


class BodyLimitMiddleware:
    """Refuse bodies above `max_bytes` with 413, before the application reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over the limit of {self.max_bytes} bytes"
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, 400, "invalid_request_error", "invalid Content-Length", scope=scope)
                    return
        if declared is not None:
            if declared > self.max_bytes:
                await send_error(send, 413, "request_too_large", too_large, scope=scope)
                return
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read up to the limit first, then replay it to the app.
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await send_error(send, 413, "request_too_large", too_large, scope=scope)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
