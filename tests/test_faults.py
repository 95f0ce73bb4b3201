"""Faults survived: broken checkpoints, errors inside generation, a dead worker."""

import asyncio
import json
import shutil
import struct

import httpx
import mlx.core as mx
import pytest

from models.errors import EngineUnavailableError
from models.single_stream import SingleStream
from server.app import create_app
from tests.conftest import BUNDLED, caught_by_catch_all, make_settings


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")

    def copy(name):
        folder = root / name
        shutil.copytree(BUNDLED, folder)
        return folder

    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    corrupt = copy("corrupt") / "model.safetensors"
    corrupt.write_bytes(b"\xff" * 8 + corrupt.read_bytes()[8:])
    (copy("no-weights") / "model.safetensors").unlink()
    (copy("no-config") / "config.json").unlink()
    (copy("bad-config") / "config.json").write_text("{not json")
    (copy("wrong-arch") / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    (copy("deep-config") / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    deep_header = b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (copy("deep-header") / "model.safetensors").write_bytes(struct.pack("<Q", len(deep_header)) + deep_header)
    folder_weights = copy("weights-folder") / "model.safetensors"
    folder_weights.unlink()
    folder_weights.mkdir()
    config_folder = copy("config-folder") / "config.json"
    config_folder.unlink()
    config_folder.mkdir()
    config = json.loads((BUNDLED / "config.json").read_text())
    (copy("bad-types") / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    (copy("bad-tokenizer") / "tokenizer.json").write_text("{not json")
    (copy("deep-tokenizer") / "tokenizer.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    header = json.dumps({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}).encode()
    (copy("negative-shape") / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    weights = copy("missing-tensor") / "model.safetensors"
    tensors = mx.load(str(weights))
    tensors.pop("model.norm.weight")
    mx.save_safetensors(str(weights), tensors, metadata={"format": "mlx"})
    return root


@pytest.fixture
async def client(broken_models):
    app = create_app(make_settings(model_dirs=(broken_models,), warmup=False))
    async with app.router.lifespan_context(app):
        await app.state.start_task
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            yield app, c


async def still_serving(client):
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["text"] == "42"


HEADERS_INTACT = {"wrong-arch", "bad-types", "bad-tokenizer", "deep-tokenizer", "missing-tensor"}


@pytest.mark.parametrize("name,words", [
    ("truncated", ["truncated/model.safetensors", "truncated"]),
    ("corrupt", ["corrupt/model.safetensors"]),
    ("no-weights", ["no-weights", "safetensors"]),
    ("no-config", ["no-config/config.json", "missing"]),
    ("bad-config", ["bad-config/config.json"]),
    ("wrong-arch", ["wrong-arch"]),
    ("deep-config", ["deep-config/config.json", "nested too deeply"]),
    ("deep-header", ["deep-header/model.safetensors", "nested too deeply"]),
    ("weights-folder", ["weights-folder/model.safetensors", "not a regular file"]),
    ("config-folder", ["config-folder/config.json", "cannot be read"]),
    ("bad-types", ["bad-types/config.json", "TypeError"]),
    ("bad-tokenizer", ["bad-tokenizer's tokenizer files", "tokenizer.json"]),
    ("deep-tokenizer", ["deep-tokenizer's tokenizer files", "RecursionError"]),
    ("negative-shape", ["negative-shape/model.safetensors", "invalid header entry"]),
    ("missing-tensor", ["missing-tensor/", "model*.safetensors", "model.norm.weight"]),
])
async def test_broken_checkpoints_are_clear_errors_and_nothing_else_breaks(client, name, words, caplog):
    _, c = client
    requests = [c.post("/generate", json={"prompt": "1+1=", "model": name}),
                c.post("/models/load", json={"model": name, "dtype": "float16"})]
    if name not in HEADERS_INTACT:  # an estimate reads only config.json and the safetensors headers
        requests.append(c.get("/memory/estimate", params={"model": name}))
    for request in requests:
        r = await request
        # deterministic: never a 503 or a Retry-After that would send clients back for the same error
        assert 400 <= r.status_code < 600 and r.status_code not in (404, 503), r.text
        assert "retry-after" not in r.headers
        message = r.json()["error"]["message"]
        assert "internal error" not in message, message
        for w in words:
            assert w in message, message
        assert "Traceback" not in r.text and "/tmp" not in r.text and "/work" not in r.text
    await still_serving(c)
    assert caught_by_catch_all(caplog) == []


async def test_an_error_inside_generation_fails_that_request_only(client, monkeypatch):
    _, c = client
    await still_serving(c)
    original = SingleStream.step
    calls = {"n": 0}

    def failing_step(self):  # fault injection: the first step raises as an out-of-memory would
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("simulated out of memory")
        return original(self)

    monkeypatch.setattr(SingleStream, "step", failing_step)
    r = await c.post("/generate", json={"prompt": "1+2=", "max_tokens": 8})
    assert r.status_code == 503 and r.json()["error"]["type"] == "generation_failed"
    await still_serving(c)
    assert (await c.get("/health")).status_code == 200


async def test_a_dead_worker_turns_health_to_503_and_no_request_hangs(client):
    app, c = client
    engine = app.state.engine

    def die():  # fault injection: something the worker cannot survive
        raise SystemExit("simulated crash")

    with pytest.raises(EngineUnavailableError):
        await asyncio.wait_for(engine._call(die), 10)
    for _ in range(50):
        if (await c.get("/health")).status_code == 503:
            break
        await asyncio.sleep(0.05)
    assert (await c.get("/health")).status_code == 503
    assert (await c.get("/health/ready")).status_code == 503
    r = await asyncio.wait_for(c.post("/generate", json={"prompt": "1+1=", "max_tokens": 4}), 10)
    assert r.status_code == 503
