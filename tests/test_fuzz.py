"""schemathesis against the app's own OpenAPI schema, positive and negative cases: no 5xx, no
response that breaks the schema. Generation is kept short by the settings, not by the fuzzer."""

import asyncio
import logging
import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from server.app import create_app
from tests.conftest import CATCH_ALL_MESSAGES, make_settings

# No new dtype report may start (a 429, an expected status): one would run beside the whole sweep and slow every
# call; the report routes' input checks are swept all the same, real reports run in tests/test_report_api.py.
APP = create_app(make_settings(max_tokens_limit=8, default_max_tokens=8, warmup=False, report_starts_per_hour=0))


async def app_with_engine_running(scope, receive, send):
    """The app, with lifespan events acknowledged but not run: schemathesis opens a client (and a
    lifespan) per call, while the engine here is started once by the fixture below."""
    if scope["type"] != "lifespan":
        return await APP(scope, receive, send)
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


# Statuses that depend on more than the schema: 400 for a prompt longer than the model's context
# (counted in tokens), 413 for a body over the byte limit. No 5xx is ever expected.
# A call waits for the worker, which may be in a step of a report an earlier case started (a load, kernels
# compiled for a new precision): seconds on a loaded machine. Stalls are measured elsewhere (bench.stall).
CONFIG = SchemathesisConfig.from_dict({"request-timeout": 120, "checks": {
    "positive_data_acceptance": {"expected-statuses": ["2xx", 400, 401, 404, 409, 429]},
    "negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 406, 409, 413, 415, 422, 429]},
}})
schema = schemathesis.openapi.from_asgi("/openapi.json", app_with_engine_running, config=CONFIG)


class CatchAllRecords(logging.Handler):
    """Keeps what the catch-alls log during the sweep: each one is a bug to fix at its cause."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() in CATCH_ALL_MESSAGES:
            self.messages.append(f"{record.getMessage()}: {record.exc_info and record.exc_info[1]!r}")


CATCH_ALL = CatchAllRecords()


@pytest.fixture(scope="module", autouse=True)
def running_engine():
    """Start the app's lifespan on a loop of its own: schemathesis calls the ASGI app synchronously."""
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), None

    async def run():
        nonlocal stop
        stop = asyncio.Event()
        async with APP.router.lifespan_context(APP):
            await APP.state.start_task
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(120)
    logging.getLogger().addHandler(CATCH_ALL)
    yield
    logging.getLogger().removeHandler(CATCH_ALL)
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)


CASES = []


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    CASES.append(case.operation.label)
    case.call_and_validate()


def test_at_least_a_thousand_cases_ran():
    assert len(CASES) >= 1000, f"only {len(CASES)} cases"


def test_no_case_reached_a_catch_all():
    assert CATCH_ALL.messages == []
