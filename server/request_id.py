"""X-Request-Id: the client's id when it is a plain token, else a new one; every response carries it."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
# What a client's id may be: a short token with no spaces or control characters, safe to log and echo.
VALID_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id(scope: Scope) -> str | None:
    """The id of the request this scope belongs to (set by RequestIdMiddleware)."""
    return scope.get("state", {}).get("request_id")


class RequestIdMiddleware:
    """Takes the request's `X-Request-Id` if it matches VALID_ID (otherwise, or when absent, makes a random
    one), stores it in the scope's state and sets it on the response, errors and refusals included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope.get("headers", ()) if name == HEADER), b"")
        rid = given if VALID_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
