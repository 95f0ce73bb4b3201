"""Each generation as it passes through its route: the request metrics (server/serving_metrics.py) and one
log line when it ends, with its request id, variant, tokens, timings, status and finish reason."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from models.api import Finished, GenerationParams, Started
from models.errors import EngineError
from models.weights.dtypes import normalize_dtype
from server.errors import engine_error_status
from server.request_id import request_id
from server.serving_metrics import ServingMetrics
from server.streaming import Events

request_log = logging.getLogger("dtype_serve.requests")
CLIENT_CLOSED = 499  # nginx's "client closed request"
OTHER = "other"  # the label of a model or dtype name no request has been admitted under (yet)
MAX_KNOWN_NAMES = 256  # (model, dtype) spellings remembered with the variant they resolved to


@dataclass
class _Outcome:
    """What one generation came to, filled in as its events pass."""

    model: str
    dtype: str
    started: Started | None = None
    finished: Finished | None = None
    error_type: str | None = None
    error_status: int | None = None

    @property
    def status(self) -> int:
        """The HTTP status the client got: an error's before admission, else 200 (a stream's error
        arrives in an event after the 200), or 499 when the client left before the end."""
        if self.started is None and self.error_status is not None:
            return self.error_status
        if self.finished is None and self.error_type is None:
            return CLIENT_CLOSED
        return 200


class GenerationObserver:
    """Counts and logs the generations of one app."""

    def __init__(self, metrics: ServingMetrics, default_model: str, default_dtype: str,
                 log_prompts: bool = False) -> None:
        self.metrics = metrics
        self.default_model = default_model
        self.default_dtype = default_dtype
        self.log_prompts = log_prompts
        # what each spelling a client used resolved to, once admitted: labels of waits and errors
        self._admitted_as: dict[tuple[str | None, str | None], tuple[str, str]] = {}

    def asked_labels(self, params: GenerationParams) -> tuple[str, str]:
        """(model, dtype) labels for a request not (yet) admitted: the variant its spelling resolved to
        before, else the default model or OTHER and the canonical dtype or OTHER. Bounded: a client's
        made-up names never become new label values."""
        key = (params.model, params.dtype)
        if key in self._admitted_as:
            return self._admitted_as[key]
        model = self.default_model if params.model in (None, self.default_model) else OTHER
        try:
            dtype = normalize_dtype(params.dtype) if params.dtype else self.default_dtype
        except (EngineError, ValueError):
            dtype = OTHER
        return model, dtype

    async def observe(self, request: Request, params: GenerationParams, events: Events) -> AsyncIterator[Any]:
        """`events`, passed on unchanged; closing this closes them."""
        outcome = _Outcome(*self.asked_labels(params))
        arrival = time.perf_counter()
        waiting = self.metrics.waiting.labels(outcome.model, outcome.dtype)
        waiting.inc()
        try:
            async for event in events:
                if isinstance(event, Started):
                    outcome.started, outcome.model, outcome.dtype = event, event.model, event.dtype
                    if len(self._admitted_as) < MAX_KNOWN_NAMES:
                        self._admitted_as[(params.model, params.dtype)] = (event.model, event.dtype)
                    waiting.dec()
                    self.metrics.running.labels(event.model, event.dtype).inc()
                elif isinstance(event, Finished):
                    outcome.finished = event
                yield event
        except EngineError as e:
            outcome.error_status, outcome.error_type = engine_error_status(e)
            raise
        except Exception:  # a bug: the catch-all answers 500 (server/errors.py)
            outcome.error_status, outcome.error_type = 500, "internal_error"
            raise
        finally:
            await events.aclose()
            self._record(outcome, waiting)
            self._log(request, params, outcome, time.perf_counter() - arrival)

    def _record(self, outcome: _Outcome, waiting: Any) -> None:
        if outcome.started is None:
            waiting.dec()
        else:
            self.metrics.running.labels(outcome.model, outcome.dtype).dec()
        if outcome.finished is not None:
            self.metrics.finished(outcome.finished)
        elif outcome.error_type is not None:
            self.metrics.failed(outcome.model, outcome.dtype, outcome.error_type)
        elif outcome.started is not None:
            self.metrics.aborted(outcome.model, outcome.dtype)

    def _log(self, request: Request, params: GenerationParams, outcome: _Outcome, duration_s: float) -> None:
        fields = request_fields(request, outcome, duration_s)
        if self.log_prompts:
            fields["prompt"] = params.prompt if params.messages is None else list(params.messages)
        request_log.info("%s %s %s/%s %s %s", fields["request_id"], fields["path"], fields["model"],
                         fields["dtype"], fields["status"], fields.get("finish_reason") or fields.get("error") or "",
                         extra={"fields": fields})


def request_fields(request: Request, outcome: _Outcome, duration_s: float) -> dict[str, Any]:
    """A request line's fields: never the prompt's text (GenerationObserver adds it only when asked)."""
    fields: dict[str, Any] = {"request_id": request_id(request.scope), "path": request.url.path,
                              "model": outcome.model, "dtype": outcome.dtype, "status": outcome.status,
                              "duration_s": round(duration_s, 6)}
    if outcome.started is not None:
        fields["prompt_tokens"] = outcome.started.prompt_tokens
    if (done := outcome.finished) is not None:
        fields.update(completion_tokens=done.usage.completion_tokens, cached_tokens=done.usage.cached_tokens,
                      finish_reason=done.finish_reason, queue_s=round(done.queue_s, 6),
                      time_to_first_token_s=round(done.time_to_first_token_s, 6), total_s=round(done.total_s, 6),
                      tokens_per_second=round(done.decode_tokens_per_second, 3))
    elif outcome.started is not None and outcome.error_type is None:
        fields["finish_reason"] = "abort"
    if outcome.error_type is not None:
        fields["error"] = outcome.error_type
    return fields


def observed(request: Request, params: GenerationParams, events: Events) -> AsyncIterator[Any]:
    """The route's view of a generation, observed by its app's GenerationObserver."""
    return request.app.state.generation_observer.observe(request, params, events)
