"""Start-up warm-up: one-time costs are paid before readiness, not by the first request."""

import json
import shutil

from models.api import GenerationParams
from models.engine.config import EngineConfig
from models.engine.engine import MLXEngine
from models.errors import InvalidRequestError
from models.weights.catalog import ModelCatalog
from server.app import create_app
from server.warmup import warm_http
from tests.conftest import BUNDLED, make_settings


async def test_http_warm_up_reaches_routing_past_the_key_check():
    """The warm-up request must get through the API-key middleware to the router (404), or the
    route tables are still built by the first real request."""
    app = create_app(make_settings(api_key=("key-one",), warmup=False))
    assert await warm_http(app, "key-one") == 404
    assert await warm_http(app, None) == 401


async def test_engine_warms_up_with_a_tokenizer_that_has_no_chat_template(tmp_path):
    """The warm-up renders the chat template once; a model without one still starts, and a chat
    request to it is refused as the client's mistake (400), saying why."""
    folder = tmp_path / "no-template"
    shutil.copytree(BUNDLED, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template")
    config_path.write_text(json.dumps(config))
    engine = MLXEngine(ModelCatalog({folder.name: folder}), EngineConfig(folder.name, "float32", warmup=True))
    await engine.start()
    try:
        assert engine.health().ready
        try:
            async for _ in engine.generate(GenerationParams(messages=({"role": "user", "content": "1+1="},))):
                pass
            raise AssertionError("a chat request without a template should fail")
        except InvalidRequestError as e:
            assert str(e) == "this model's tokenizer has no chat template: send a plain prompt"
    finally:
        await engine.stop()


async def test_the_warm_up_overlap_does_not_make_the_first_request_wait():
    """The warm-up overlaps requests on purpose; the first real request must not wait for a burst."""
    engine = MLXEngine(ModelCatalog({BUNDLED.name: BUNDLED}),
                       EngineConfig(BUNDLED.name, "float32", warmup=True, gather_s=0.5))
    await engine.start()
    try:
        waits = engine.stats.gather_waits
        async for _ in engine.generate(GenerationParams(prompt="17+25=", max_tokens=3)):
            pass
        assert engine.stats.gather_waits == waits
    finally:
        await engine.stop()
