"""The HTTP side of the warm-up: one-time costs paid at startup, not by the first request."""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message

UNROUTED_PATH = "/.warm-up"  # matches no route, so routing looks at every route once


async def warm_http(app: ASGIApp, api_key: str | None = None) -> int:
    """Send one request that no route matches through the app, in process; returns its status.

    FastAPI builds an included router's route table on the first request that reaches it, and anyio
    loads its asyncio backend on first use (the first streamed response): ~30 ms each otherwise.
    """
    await anyio.sleep(0)
    headers = [(b"host", b"warm-up")]
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": UNROUTED_PATH, "raw_path": UNROUTED_PATH.encode(), "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status
