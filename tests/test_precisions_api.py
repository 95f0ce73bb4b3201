"""Quantized precisions through HTTP and the openai SDK: mlx-lm's greedy tokens for a model mlx-lm
quantized the same way, alone and batched; the registry, the budget and `fit` with quantized variants."""

import asyncio

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import generate as mlx_lm_generate
from mlx_lm.utils import load_tokenizer
from openai import OpenAI

from models.weights.dtypes import parse_precision
from tests.conftest import BUNDLED
from tests.test_precisions import mlx_lm_quantized
from tests.test_registry import MiB, app_client, close

PROMPTS = ["17+25=", "3+4=", "The cat", "88+11="]
MAX_TOKENS = 12


class Float32Products(nn.QuantizedLinear):
    """MLX's quantized_matmul in float32, the result in the layer's dtype: a bfloat16 model's quantized products
    summed as MLX's GPU kernels sum them. MLX's bfloat16 CPU kernel sums in bfloat16 (|error| ~0.15 at 1,536
    inputs against ~0.004 for rounding the float32 sum), which alone changes a greedy token of the bundled q4."""

    def __call__(self, x):
        return float32_products(self, x)


class Float32ProductsEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        return float32_products(self, x)


def float32_products(layer, x):
    up = [None if a is None else a.astype(mx.float32) for a in (x, layer["scales"], layer.get("biases"))]
    return mx.quantized_matmul(up[0], layer["weight"], up[1], up[2], transpose=True, group_size=layer.group_size,
                               bits=layer.bits, mode=layer.mode).astype(x.dtype)


def mlx_lm_reference(precision: str):
    """mlx-lm's model quantized as `precision` names it (q4 or q4:float32); with a bfloat16 rest its quantized
    products are summed in float32 (Float32Products), the rounding the server keeps on every device."""
    parsed = parse_precision(precision)
    float_dtype = parsed.float_dtype or "bfloat16"
    model, _ = mlx_lm_quantized(BUNDLED, parsed.quantization.name, float_dtype)
    if float_dtype != "float32":
        for _, module in model.named_modules():
            twin = {nn.QuantizedLinear: Float32Products, nn.QuantizedEmbedding: Float32ProductsEmbedding}
            module.__class__ = twin.get(type(module), type(module))
    return model


@pytest.fixture(scope="module")
def mlx_lm_greedy():
    """mlx-lm's greedy text for each prompt (plain, and as a chat) at each precision."""
    tokenizer = load_tokenizer(BUNDLED)
    cache: dict = {}

    def text(precision: str, prompt: str, chat: bool = False) -> str:
        key = (precision, prompt, chat)
        if key not in cache:
            model = mlx_lm_reference(precision)
            if chat:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=False)
            cache[key] = mlx_lm_generate(model, tokenizer, prompt=prompt, max_tokens=MAX_TOKENS)
        return cache[key]

    return text


# a float32 rest: mlx-lm's own model unchanged is the reference
GREEDY_PRECISIONS = ["q8", "q4", "q8:float32", "q4:float32"]


@pytest.mark.parametrize("precision", GREEDY_PRECISIONS)
async def test_generate_gives_mlx_lm_greedy_tokens_alone(client, mlx_lm_greedy, precision):
    for prompt in PROMPTS:
        r = await client.post("/generate", json={"prompt": prompt, "dtype": precision, "max_tokens": MAX_TOKENS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["dtype"] == precision and body["float_dtype"] == (parse_precision(precision).float_dtype
                                                                      or "bfloat16")
        assert body["text"] == mlx_lm_greedy(precision, prompt)


@pytest.mark.parametrize("precision", GREEDY_PRECISIONS)
async def test_generate_gives_mlx_lm_greedy_tokens_batched(client, mlx_lm_greedy, precision):
    bodies = [{"prompt": p, "dtype": precision, "max_tokens": MAX_TOKENS} for p in PROMPTS * 2]
    responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert [r.json()["text"] for r in responses] == [mlx_lm_greedy(precision, p) for p in PROMPTS * 2]


@pytest.fixture(scope="module")
def oai(live_server):
    return OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("precision", ["q8", "q4"])
def test_openai_sdk_chat_and_completions_give_mlx_lm_greedy_tokens(oai, mlx_lm_greedy, precision):
    chat = oai.chat.completions.create(model=f"tiny-arith:{precision}", temperature=0, max_tokens=MAX_TOKENS,
                                       messages=[{"role": "user", "content": "17+25="}])
    assert chat.model == f"tiny-arith:{precision}" and chat.model_extra["float_dtype"] == "bfloat16"
    assert chat.choices[0].message.content == mlx_lm_greedy(precision, "17+25=", chat=True)
    completion = oai.completions.create(model="tiny-arith", prompt="The cat", temperature=0, max_tokens=MAX_TOKENS,
                                        extra_body={"dtype": precision})
    assert completion.model == f"tiny-arith:{precision}"
    assert completion.choices[0].text == mlx_lm_greedy(precision, "The cat")
    ids = {m.id for m in oai.models.list().data}
    assert {"tiny-arith:q8", "tiny-arith:q4", "tiny-arith:mxfp4"} <= ids


def test_openai_sdk_unknown_precision_is_a_422_listing_the_valid_ones(oai):
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.completions.create(model="tiny-arith", prompt="1+1=", max_tokens=2, extra_body={"dtype": "q7"})
    assert "q4" in str(info.value) and "mxfp4" in str(info.value)
    with pytest.raises(openai.NotFoundError):  # "q7" is no precision: the whole id is an unknown model
        oai.completions.create(model="tiny-arith:q7", prompt="1+1=", max_tokens=2)


async def test_load_report_and_unload_a_quantized_variant(client):
    loaded = (await client.post("/models/load", json={"dtype": "q4g32:float32"})).json()
    assert loaded["dtype"] == "q4g32:float32" and loaded["float_dtype"] == "float32"
    assert loaded["quantization"] == "q4g32" and loaded["quantization_config"]["group_size"] == 32
    roles = loaded["bytes_by_role"]
    assert sum(roles.values()) == loaded["total_bytes"] == sum(loaded["bytes_by_dtype"].values())
    assert roles["packed_weights"] == loaded["bytes_by_dtype"]["uint32"] and roles["biases"] == roles["scales"]
    assert loaded["bits_per_weight"] == round(loaded["total_bytes"] * 8 / loaded["parameter_count"], 4)
    estimate = (await client.get("/memory/estimate", params={"dtype": "q4g32:float32"})).json()["estimates"][0]
    assert estimate["total_bytes"] == loaded["total_bytes"]
    models = (await client.get("/models")).json()
    assert {"model": "tiny-arith", "dtype": "q4g32:float32"} in [
        {"model": v["model"], "dtype": v["dtype"]} for v in models["resident"]]
    assert (await client.get("/v1/models")).json()["data"][-1]["id"] == "tiny-arith:q4g32:float32"
    r = await client.delete("/models/tiny-arith/q4g32:float32")
    assert r.status_code == 200 and r.json()["freed_bytes"] >= 0.9 * loaded["total_bytes"]
    resident = [v["dtype"] for v in (await client.get("/memory")).json()["variants"]]
    assert "q4g32:float32" not in resident


async def test_estimates_of_every_precision_before_loading(client):
    before = (await client.get("/memory")).json()["budget"]["loads"]
    r = await client.get("/memory/estimate", params={"include_quantized": True})
    estimates = {e["dtype"]: e for e in r.json()["estimates"]}
    assert list(estimates)[:3] == ["float32", "float16", "bfloat16"]
    assert {"q8", "q6", "q5", "q4", "q3", "q2", "mxfp8", "mxfp4", "nvfp4"} <= set(estimates)
    sizes = [estimates[q]["total_bytes"] for q in ("bfloat16", "q8", "q6", "q5", "q4", "q3", "q2")]
    assert sizes == sorted(sizes, reverse=True)
    assert (await client.get("/memory")).json()["budget"]["loads"] == before


async def test_a_quantized_variant_serves_under_a_budget_only_it_fits():
    # q4 0.6 MB and a request's KV buffers (a step of 256 positions, bfloat16: 0.5 MiB); bfloat16 needs 2.1 MB
    app, ctx, client = await app_client(dtype="q4", memory_budget=str(3 * MiB // 2))
    try:
        r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["text"] == "42" and r.json()["dtype"] == "q4"
        refused = await client.post("/generate", json={"prompt": "17+25=", "dtype": "bfloat16", "max_tokens": 8})
        assert refused.status_code == 507 and refused.json()["error"]["dtype"] == "bfloat16"
        assert [v["dtype"] for v in (await client.get("/memory")).json()["variants"]] == ["q4"]
        again = await client.post("/generate", json={"prompt": "17+25=", "dtype": "int4", "max_tokens": 8})
        assert again.status_code == 200 and again.json()["text"] == "42"
    finally:
        await close(ctx, client)


# bundled model: bfloat16 2.13 MB, q8 1.13 MB; its bfloat16 KV cache of 256 tokens 0.52 MB per sequence
@pytest.mark.parametrize("batch,expected", [(2, "q8"), (1, "bfloat16")])
async def test_fit_picks_the_best_precision_that_fits_with_the_kv_reserve(batch, expected):
    app, ctx, client = await app_client(dtype="fit", memory_budget="3000000", max_batch_size=batch)
    try:
        ready = (await client.get("/health/ready")).json()
        assert ready["default_dtype"] == "fit" and ready["fit"]["chosen"] == expected
        default = (await client.get("/models")).json()["default"]
        tried = default["fit"]["tried"]
        assert [t["dtype"] for t in tried] == (["bfloat16", "q8"] if expected == "q8" else ["bfloat16"])
        assert tried[-1]["fits"] and all(not t["fits"] for t in tried[:-1])
        assert all(t["weights_bytes"] + t["kv_reserve_bytes"] <= 3000000 for t in tried if t["fits"])
        r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert r.json()["dtype"] == expected and r.json()["text"] == "42"
        r = await client.post("/generate", json={"prompt": "17+25=", "dtype": "fit", "max_tokens": 8})
        assert r.json()["dtype"] == expected
    finally:
        await close(ctx, client)


async def test_fit_follows_the_operators_order():
    app, ctx, client = await app_client(dtype="fit", fit_order=("q6", "q4"))
    try:
        assert (await client.get("/health/ready")).json()["fit"]["chosen"] == "q6"
    finally:
        await close(ctx, client)


async def test_a_quantized_checkpoint_refuses_another_quantization_and_keeps_serving(model_dir):
    app, ctx, client = await app_client(model_dirs=(model_dir,))
    try:
        r = await client.post("/generate", json={"prompt": "1+1=", "model": "small-q4", "dtype": "q8"})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["type"] == "precision_unavailable" and "already quantized" in error["message"]
        assert "/" not in error["message"]
        same = await client.post("/generate", json={"prompt": "1+1=", "model": "small-q4", "dtype": "q4",
                                                    "max_tokens": 2})
        assert same.status_code == 200 and same.json()["dtype"] == "bfloat16"  # served as it is
        ok = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["text"] == "42"
    finally:
        await close(ctx, client)


async def test_a_quantized_variant_is_derived_from_a_resident_float_one(model_dir):
    app, ctx, client = await app_client(model_dirs=(model_dir,))
    try:
        body = {"prompt": "The cat", "model": "small-f32", "dtype": "q4", "max_tokens": 16, "ignore_eos": True}
        from_file = await client.post("/models/load", json={"model": "small-f32", "dtype": "q4"})
        assert from_file.json()["loaded_from"] == "checkpoint"
        text_from_file = (await client.post("/generate", json=body)).json()["text"]
        assert (await client.delete("/models/small-f32/q4")).status_code == 200
        await client.post("/models/load", json={"model": "small-f32", "dtype": "float32"})
        derived = (await client.post("/models/load", json={"model": "small-f32", "dtype": "q4"})).json()
        assert derived["loaded_from"] == "float32"
        assert derived["bytes_by_dtype"] == from_file.json()["bytes_by_dtype"]
        assert (await client.post("/generate", json=body)).json()["text"] == text_from_file
    finally:
        await close(ctx, client)


@pytest.mark.parametrize("warmup", [True, False])
async def test_a_variant_loaded_at_run_time_is_warmed_before_it_serves(warmup):
    app, ctx, client = await app_client(warmup=warmup)
    try:
        loaded = (await client.post("/models/load", json={"dtype": "q8"})).json()
        assert (loaded["warmup_seconds"] > 0) == warmup
    finally:
        await close(ctx, client)


async def test_quantized_variants_are_evicted_least_recently_used_and_the_default_stays_pinned():
    # the pinned bfloat16 default (2.13 MB) + q8 (1.13 MB) fit 3.8 MB; q6 (0.86 MB) then needs q8 gone
    app, ctx, client = await app_client(memory_budget="3800000")
    try:
        for precision in ("q8", "q6"):
            r = await client.post("/generate", json={"prompt": "1+1=", "dtype": precision, "max_tokens": 2})
            assert r.status_code == 200
        memory = (await client.get("/memory")).json()
        assert {v["dtype"] for v in memory["variants"]} == {"bfloat16", "q6"}
        assert memory["budget"]["used_bytes"] <= memory["budget"]["budget_bytes"]
        # float32 (4.25 MB) cannot fit even with q6 evicted: refused before anything is evicted or allocated
        refused = await client.post("/models/load", json={"dtype": "float32"})
        assert refused.status_code == 507 and refused.json()["error"]["dtype"] == "float32"
        assert {v["dtype"] for v in (await client.get("/memory")).json()["variants"]} == {"bfloat16", "q6"}
    finally:
        await close(ctx, client)
