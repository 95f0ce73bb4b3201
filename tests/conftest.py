"""Shared fixtures. The BLAS is chosen before anything imports MLX, as the server does."""

from __future__ import annotations

from models.platform.blas import configure_blas

configure_blas("auto")

import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from models.weights.catalog import default_model_ref  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402

BUNDLED = Path(default_model_ref())
ROOT = Path(__file__).resolve().parents[1]


def make_settings(**overrides) -> Settings:
    return Settings(model=str(BUNDLED), **overrides)


@pytest.fixture(scope="session")
async def app():
    """The real app on the bundled model, its engine started and warm."""
    application = create_app(make_settings(model_dirs=()))
    async with application.router.lifespan_context(application):
        await application.state.start_task
        assert application.state.engine.health().ready
        yield application


@pytest.fixture(scope="session")
async def client(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
        yield c


# What the catch-alls log (server/errors.py, models/engine/worker.py): an exception nobody expected, i.e. a bug.
CATCH_ALL_MESSAGES = ("unhandled error", "admitting a request failed", "engine call failed")


def caught_by_catch_all(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage() in CATCH_ALL_MESSAGES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports_from(count: int) -> int:
    """A port from which `count` consecutive ports are free now (mlx.launch's --starting-port gives rank i the
    port start + i: a free first port alone let a rank find its own taken)."""
    for _ in range(100):
        start = free_port()
        sockets = []
        try:
            for port in range(start, start + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def start_server(*args: str, env: dict | None = None, timeout: float = 120, preexec_fn=None):
    """A real `dtype-serve` process on a free port; returns (process, base URL) once ready.
    `preexec_fn` runs in the child before it starts (e.g. to lower its resource limits)."""
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning", *args],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become ready: {proc.stdout.read()[-3000:]}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def live_server():
    """One real server for the tests that need TCP (the openai SDK, streaming over sockets)."""
    proc, base = start_server()
    yield base
    stop_server(proc)


@pytest.fixture(scope="session")
def tools_model(tmp_path_factory) -> Path:
    """The bundled model as `tiny-arith-tools`, its chat template rendering tools (each tool's name and a
    `;`, then a newline, before the messages) and tool calls (name, then the arguments as JSON, after the
    message's content). Without them it renders exactly as the bundled one."""
    folder = tmp_path_factory.mktemp("models") / "tiny-arith-tools"
    shutil.copytree(BUNDLED, folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    tools = "{% if tools %}{% for tool in tools %}{{ tool['function']['name'] }};{% endfor %}{{ '\\n' }}{% endif %}"
    calls = ("{% if message['tool_calls'] is defined %}{% for call in message['tool_calls'] %}"
             "{{ call['function']['name'] }}{{ call['function']['arguments'] | tojson }}{% endfor %}{% endif %}")
    template = config["chat_template"].replace("{{ bos_token }}", "{{ bos_token }}" + tools, 1)
    assert template.endswith("{% endfor %}")
    config["chat_template"] = template.removesuffix("{% endfor %}") + calls + "{% endfor %}"
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tools_server(tools_model):
    """A real server on `tools_model`, started with its folder's path as --model (the SDK front-door tests)."""
    proc, base = start_server("--model", str(tools_model))
    yield base
    stop_server(proc)


@pytest.fixture(scope="session")
def random_tools_server(tools_model, tmp_path_factory):
    """A real server on a llama with random weights whose chat template renders tools and tool calls (as
    `tools_model`): its output is noise unless a tool choice is enforced."""
    from models.testing.synthetic import llama_config, make_llama_checkpoint

    folder = make_llama_checkpoint(tmp_path_factory.mktemp("models") / "random-tools",
                                   llama_config(hidden=64, layers=2, vocab=100, context=2048), seed=3,
                                   tokenizer_from=tools_model)
    proc, base = start_server("--model", str(folder))
    yield base
    stop_server(proc)


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event in a body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def fail_first_step(monkeypatch):
    """Fault injection: the next decode step raises, as an out-of-memory would."""
    from models.decode.single_stream import SingleStream

    original, calls = SingleStream.step, []

    def failing_step(self):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("simulated out of memory")
        return original(self)

    monkeypatch.setattr(SingleStream, "step", failing_step)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Two small llamas under one model folder: float32, and quantized to 4 bits by mlx-lm's own layout."""
    from models.testing.synthetic import llama_config, make_llama_checkpoint

    root = tmp_path_factory.mktemp("models")
    config = llama_config(hidden=256, layers=2, vocab=100, intermediate=512, context=512)
    make_llama_checkpoint(root / "small-f32", config, dtype="float32")
    make_llama_checkpoint(root / "small-q4", config, dtype="bfloat16", quantize_bits=4)
    return root
