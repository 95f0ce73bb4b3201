"""uvicorn's h11 protocol with the limits a public server needs: a bounded request head (431), slow and
idle clients timed out (408 or a quiet close), and refusals that the client can read (no reset)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# After a refusal, unread request bytes are read and dropped for a while before closing: closing a socket
# with unread data sends a reset, which can destroy the response before the client reads it.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20


@dataclass(frozen=True)
class ConnectionLimits:
    max_head_bytes: int  # request line and headers
    max_headers: int
    head_timeout_s: float  # the whole head, from the connection's opening or the request's first byte
    body_timeout_s: float  # the whole body, from the end of the head


class _RefusedHead(h11.RemoteProtocolError):
    pass


class LimitedConnection(h11.Connection):
    """An h11 server connection that refuses a request head over the limits, and remembers the status
    of the last protocol error it raised."""

    def __init__(self, limits: ConnectionLimits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.limits = limits
        self.refusal: tuple[int, str] = (400, "invalid HTTP request")

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:  # h11: an incomplete head has outgrown the buffer limit
                self.refusal = (431, self._too_large())
            elif not isinstance(e, _RefusedHead):
                self.refusal = (e.error_status_hint, f"invalid HTTP request: {str(e)[:200]}")
            raise
        if isinstance(event, h11.Request):
            self._check_head(event)
        return event

    def _check_head(self, request: h11.Request) -> None:
        if len(request.headers) > self.limits.max_headers:
            self.refusal = (431, f"more than {self.limits.max_headers} request headers")
            raise _RefusedHead(self.refusal[1], error_status_hint=431)
        size = len(request.method) + len(request.target) + 13 + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > self.limits.max_head_bytes:
            self.refusal = (431, self._too_large())
            raise _RefusedHead(self.refusal[1], error_status_hint=431)

    def _too_large(self) -> str:
        return f"request headers over the limit of {self.limits.max_head_bytes} bytes"


class LimitedH11Protocol(H11Protocol):
    """H11Protocol with ConnectionLimits; errors before the app answer in the API's JSON error shape."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = LimitedConnection(limits)
        self.limits = limits
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_phase: str | None = None  # "head" or "body" while waiting for the client
        self._head_started = False
        self._lingering = -1  # bytes dropped since a refusal; -1 while not refusing

    @classmethod
    def factory(cls, limits: ConnectionLimits) -> partial:
        """What uvicorn's `http` option takes: it builds one protocol per connection."""
        return partial(cls, limits=limits)

    # ---- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._set_phase("head")  # a connection that never sends a request is an idle client too

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        self._head_started = self._head_started or self.conn.their_state is h11.IDLE
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._lingering >= 0 or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE and self._head_started:
            self._set_phase("head")
        elif state is h11.SEND_BODY:
            self._set_phase("body")
        elif state is not h11.IDLE:
            self._set_phase(None)

    def on_response_complete(self) -> None:
        # Between requests uvicorn's keep-alive timeout applies; the head timer starts with the next byte.
        self._head_started = False
        self._set_phase(None)
        super().on_response_complete()

    # ---- timeouts ------------------------------------------------------------------------------
    def _set_phase(self, phase: str | None) -> None:
        if phase == self._read_phase:
            return
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._read_phase = phase
        if phase is not None:
            timeout = self.limits.head_timeout_s if phase == "head" else self.limits.body_timeout_s
            self._read_timer = self.loop.call_later(timeout, self._timed_out, phase)

    def _timed_out(self, phase: str) -> None:
        self._read_timer = None
        self._read_phase = None
        if self.transport.is_closing():
            return
        if phase == "head" and not self._head_started:  # nothing sent at all: just an idle connection
            self.transport.close()
            return
        if phase == "body" and self.cycle is not None:  # (during a head, the cycle is the previous request's)
            if not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app waiting for the body sees a disconnect
                self.cycle.message_event.set()
            if self.cycle.response_started:  # an answer is out (or under way): nothing more can be said
                self.transport.close()
                return
        what = "request headers" if phase == "head" else "request body"
        limit = self.limits.head_timeout_s if phase == "head" else self.limits.body_timeout_s
        self._refuse(408, "request_timeout", f"the {what} did not arrive within {limit:g} s")

    # ---- refusals ------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this for every protocol error; answer with its real status, in JSON."""
        status, message = self.conn.refusal
        type_ = "request_headers_too_large" if status == 431 else "invalid_request_error"
        self._refuse(status, type_, message)

    def _refuse(self, status: int, type_: str, message: str) -> None:
        """A JSON error, then a lingering close: drop what the client still sends, close on its EOF."""
        self._set_phase(None)
        body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": None,
                                     "status": status}}).encode()
        # Written as bytes: h11 may be in a state (a head half received) where it would send nothing.
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self._lingering = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
