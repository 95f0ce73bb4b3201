"""One client cannot stall the others: prompts are tokenized and length-checked off the MLX worker,
texts that cannot fit are refused unread, chat parts are capped."""

import threading

from models.text.prompts import PromptEncoder


def default_loaded(engine):
    """The default variant's LoadedModel (resident: a look-up, no MLX work)."""
    return engine.registry.variants[engine.registry.key(engine.default_model, engine.default_dtype)].loaded


def tokenizer_threads(monkeypatch, engine) -> list[str]:
    """Record the thread that runs each encode of the default model's tokenizer."""
    tokenizer = default_loaded(engine).tokenizer._tokenizer  # the transformers tokenizer mlx-lm wraps
    seen: list[str] = []
    original = type(tokenizer).encode

    def recording(self, *args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "encode", recording)
    return seen


async def test_prompts_and_chats_are_tokenized_off_the_mlx_worker(app, client, monkeypatch):
    seen = tokenizer_threads(monkeypatch, app.state.engine)
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["text"] == "42"
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "17+25="}],
                                                        "max_tokens": 4})
    assert r.status_code == 200
    assert len(seen) >= 2 and "mlx-worker" not in seen, seen


async def test_a_prompt_too_long_for_any_tokenization_is_refused_unread(app, client, monkeypatch):
    seen = tokenizer_threads(monkeypatch, app.state.engine)
    for route, body in (("/generate", {"prompt": "7" * 1_000_000}),
                        ("/v1/completions", {"prompt": "7" * 1_000_000}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "7" * 500_000},
                                                               {"role": "user", "content": "8" * 500_000}]})):
        r = await client.post(route, json=body)
        assert r.status_code == 400, r.text
        assert "cannot fit the context length" in r.json()["error"]["message"]
    assert seen == []  # refused from its length: the tokenizer never saw it
    r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
    assert r.json()["text"] == "42"


async def test_a_prompt_within_the_bound_but_over_the_context_is_still_a_400(client):
    r = await client.post("/generate", json={"prompt": "1+" * 2000})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


async def test_chat_text_parts_are_capped(client):
    parts = [{"type": "text", "text": "a"}] * 65
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 422
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts[:64]}],
                                                        "max_tokens": 2})
    assert r.status_code == 200


def test_the_bound_never_refuses_a_prompt_that_fits(app):
    loaded = default_loaded(app.state.engine)
    encoder = PromptEncoder.of(loaded.tokenizer, loaded.context_length)
    assert encoder.max_token_chars >= max(len(loaded.tokenizer.decode([i])) for i in range(len(
        loaded.tokenizer.get_vocab())))
    assert encoder.max_chars >= loaded.context_length


async def test_report_starts_are_limited_by_the_operator():
    from tests.test_registry import app_client, close

    app, ctx, client = await app_client(report_starts_per_hour=1)
    try:
        first = await client.post("/v1/dtypes/report", json={"dtypes": ["bf16"], "prompts": ["The cat"]})
        assert first.status_code in (200, 202), first.text
        other = await client.post("/v1/dtypes/report", json={"dtypes": ["bf16"], "prompts": ["New prompt 1"]})
        assert other.status_code == 429 and other.json()["error"]["type"] == "rate_limit_exceeded"
        assert "at most 1 new dtype reports an hour" in other.json()["error"]["message"]
        again = await client.post("/v1/dtypes/report", json={"dtypes": ["bf16"], "prompts": ["The cat"]})
        assert again.status_code in (200, 202)  # the one started is still served
        r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert r.json()["text"] == "42"
    finally:
        await close(ctx, client)


async def test_a_load_lets_the_running_streams_decode_between_its_tensors(app, monkeypatch):
    from dataclasses import replace

    from models.api import Finished, GenerationParams, TextDelta
    from models.errors import EngineError

    engine = app.state.engine
    # a step after every tensor: a count, not a time
    monkeypatch.setattr(engine.worker, "config", replace(engine.worker.config, load_step_s=0.0))
    try:
        await engine.unload(engine.default_model, "float16")
    except EngineError:
        pass  # not resident
    stream = engine.generate(GenerationParams(prompt="The cat", max_tokens=200, ignore_eos=True))
    while not isinstance(await anext(stream), TextDelta):  # decoding now
        pass
    before = engine.stats.steps_during_loads
    loaded = await engine.load(None, "float16")
    during = engine.stats.steps_during_loads - before
    events = [event async for event in stream]
    await engine.unload(engine.default_model, "float16")
    assert loaded["dtype"] == "float16"
    assert during >= 10  # the bundled model has ~40 tensors; the stream decoded between them
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 200


async def test_tokenize_and_detokenize_run_off_the_mlx_worker(app, client, monkeypatch):
    seen = tokenizer_threads(monkeypatch, app.state.engine)
    r = await client.post("/tokenize", json={"prompt": "17+25=" * 1000})
    assert r.status_code == 200 and r.json()["count"] >= 6000
    assert seen and "mlx-worker" not in seen, seen
    r = await client.post("/detokenize", json={"tokens": r.json()["tokens"][:13]})  # BOS and 12 characters
    assert r.status_code == 200 and r.json()["prompt"].endswith("17+25=17+25=")
