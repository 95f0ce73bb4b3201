"""The bundled tiny-arith model: held-out accuracy, a real train/held-out split, storage format."""

from __future__ import annotations

# The BLAS must be chosen before anything imports mlx (models.platform.blas itself does not import mlx).
from models.platform.blas import configure_blas

configure_blas("auto")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from mlx_lm import generate, load  # noqa: E402

from models.bundled import tasks  # noqa: E402
from models.bundled.evaluate import batched_greedy_accuracy, generate_accuracy  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "bundled" / "tiny-arith"


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = load(str(MODEL_DIR))
    model.set_dtype(mx.float32)
    return model, tokenizer


def test_heldout_accuracy_float32_generate(loaded):
    """Greedy accuracy through mlx_lm.generate on a deterministic 200-prompt held-out subset."""
    model, tokenizer = loaded
    items = tasks.heldout_prompts(200)
    assert len(items) == 200
    assert generate_accuracy(model, tokenizer, items) >= 0.90


def test_heldout_accuracy_float32_full_set(loaded):
    model, _ = loaded
    items = tasks.heldout_prompts()
    assert len(items) >= 500
    assert batched_greedy_accuracy(model, items) >= 0.90


def test_generate_stops_at_eos(loaded):
    model, tokenizer = loaded
    assert generate(model, tokenizer, prompt="17+25=", max_tokens=8) == "42"


def test_chat_template_prompt_is_answered(loaded):
    model, tokenizer = loaded
    prompt, expected = "17+25=", "42"
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == tokenizer.bos_token + prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert list(ids) == tokenizer.encode(prompt)  # same tokens as the completion prompt
    assert tasks.is_correct(expected, generate(model, tokenizer, prompt=text, max_tokens=8))
    # and on held-out prompts, through the chat template
    items = tasks.heldout_prompts(50)
    ok = 0
    for p, e in items:
        t = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                          add_generation_prompt=True, tokenize=False)
        ok += tasks.is_correct(e, generate(model, tokenizer, prompt=t, max_tokens=8))
    assert ok / len(items) >= 0.90


def test_detokenizer_concatenates_characters(loaded):
    _, tokenizer = loaded
    text = "Hello, world! 12+3=15 a ,b"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    detok = tokenizer.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text


def test_split_is_real():
    heldout = set(tasks.heldout_pairs())
    train = set(tasks.train_pairs())
    assert heldout and train
    assert not heldout & train
    assert len(heldout) + len(train) == 100 * 100
    # held out as unordered pairs: b+a is never trained on either
    assert all((b, a) in heldout for a, b in heldout)
    heldout_texts = {p + e for p, e in tasks.heldout_prompts()}
    heldout_prompts = {p for p, _ in tasks.heldout_prompts()}
    assert not heldout_texts & set(tasks.all_training_arithmetic_texts())
    # the generator the trainer draws from never yields a held-out prompt
    arith = tasks.arithmetic_samples(random.Random(1))
    seen = {next(arith)[0] for _ in range(50_000)}
    assert not seen & heldout_prompts
    for text in tasks.training_corpus(seed=0, n=20_000):
        if "=" in text:
            assert text.split("=")[0] + "=" not in heldout_prompts


def test_storage_format():
    files = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    weights = mx.load(str(MODEL_DIR / "model.safetensors"))
    assert weights and all(v.dtype == mx.bfloat16 for v in weights.values())
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16"
    tok_config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"]
