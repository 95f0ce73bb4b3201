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


def test_sampled_draws_build_no_kernel_after_the_warm_up(tmp_path):
    """With a fresh kernel cache: warm_sampling builds the fused kernels of temperature draws, and draws of one
    row and of 8 rows of a 32,000-token vocabulary then build none (the first sampled batch of a new machine
    waited ~1 s for them)."""
    import os
    import subprocess
    import sys

    code = """
import json, sys
from pathlib import Path
from models.platform.compile_cache import use_private_compile_cache
folder = use_private_compile_cache()
import mlx.core as mx
from models.decode.sampling import make_request_sampler
from models.decode.warmup import warm_sampling
count = lambda: len(list(folder.rglob('*.so')))
warm_sampling()
warmed = count()
for rows in (1, 8):
    scores = mx.random.normal((rows, 1, 32000))[:, -1, :]
    mx.eval(make_request_sampler(0.7, 1.0, None)(scores), make_request_sampler(0.7, 1.0, 3)(scores))
print(json.dumps([warmed, count()]))
"""
    env = {**os.environ, "DTYPE_SERVE_COMPILE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warmed, after = json.loads(out.stdout.strip().splitlines()[-1])
    if shutil.which("g++"):
        assert warmed > 0
    assert after == warmed
