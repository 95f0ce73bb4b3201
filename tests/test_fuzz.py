"""schemathesis against the app's own OpenAPI schema, positive and negative cases: no 5xx, no
response that breaks the schema. Generation is kept short by the settings, not by the fuzzer."""

import asyncio
import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server.app import create_app
from tests.conftest import make_settings

APP = create_app(make_settings(max_tokens_limit=8, default_max_tokens=8, warmup=False))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


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
    yield
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)


@schema.parametrize()
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate()
