"""The architectures dtype-serve supports, pinned: a tiny random checkpoint of each, served by a real server
alone and batched at every dtype, gives mlx-lm's own greedy tokens.

Where two of mlx-lm's logits are within rounding of each other, the served path may pick the other one
(batched kernels, column-major float32 weights and 16-bit sums round differently), so a text may leave
mlx-lm's only at a token where mlx-lm's own top two were that close; everything before it must be equal.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from models.testing.synthetic_archs import MIXTURES_OF_EXPERTS, TINY_CONFIGS, make_checkpoint
from models.weights.dtypes import mx_dtype
from tests.conftest import start_server, stop_server

DTYPES = ("float32", "bfloat16", "float16")
CASES = [(arch, dtype) for arch in TINY_CONFIGS for dtype in DTYPES
         if dtype == "float32" or arch not in MIXTURES_OF_EXPERTS]
PROMPTS = ("12+30=", "The quick brown fox", "7*8=", "a longer prompt that crosses a sliding window")
TOKENS = 24
# how close mlx-lm's top two log-probabilities must be for the served text to leave it there
NEAR_TIE = {"float32": 1e-3, "bfloat16": 0.125, "float16": 0.03}
if mx.default_device().type == mx.gpu:  # CUDA: TF32 float32 matmuls, padded prefill, other 16-bit kernels
    NEAR_TIE = {"float32": 0.03, "bfloat16": 0.5, "float16": 0.1}  # bf16: a few ulps of logits of ~30


@pytest.fixture(scope="module")
def archs_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    for arch in TINY_CONFIGS:
        make_checkpoint(root / arch, arch)
    proc, base = start_server("--model-dirs", str(root))
    yield root, base
    stop_server(proc)


def reference(folder, dtype: str, prompt: str) -> tuple[list[str], list[float]]:
    """mlx-lm's greedy token texts for `prompt` and, per token, the gap between its top two log-probabilities."""
    model, tokenizer = load(str(folder))
    assert not hasattr(model, "cast_predicate")  # else the cast below would not be mlx_lm.convert's
    model.set_dtype(mx_dtype(dtype))
    pieces, gaps = [], []
    for (token, logprobs), _ in zip(generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=TOKENS),
                                    range(TOKENS), strict=False):
        top = mx.sort(logprobs.astype(mx.float32))[-2:].tolist()
        pieces.append(tokenizer.decode([int(token)]))
        gaps.append(top[1] - top[0])
    return pieces, gaps


def assert_same_greedy_text(served: str, pieces: list[str], gaps: list[float], tie: float, what: str) -> None:
    expected = ""
    for piece, gap in zip(pieces, gaps, strict=True):
        if not served.startswith(expected + piece):
            assert gap <= tie, f"{what}: served {served!r} left mlx-lm's {''.join(pieces)!r} after {expected!r} " \
                               f"where mlx-lm's top two were {gap:.4f} apart"
            return
        expected += piece
    assert served == expected, what


def complete(base: str, model: str, dtype: str, prompt: str) -> str:
    r = httpx.post(f"{base}/v1/completions", timeout=120,
                   json={"model": f"{model}:{dtype}", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == f"{model}:{dtype}" and body["usage"]["completion_tokens"] == TOKENS
    return body["choices"][0]["text"]


def batched(base: str) -> int:
    """How often requests have started in the batch together or a lone one joined it."""
    worker = httpx.get(f"{base}/memory", timeout=30).json()["worker"]
    return worker["bursts_gathered"] + worker["handoffs"]


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_served_alone_and_batched_with_mlx_lms_greedy_tokens(archs_server, arch, dtype):
    root, base = archs_server
    expected = {p: reference(root / arch, dtype, p) for p in PROMPTS}
    for prompt in PROMPTS:  # one at a time: each decodes alone
        assert_same_greedy_text(complete(base, arch, dtype, prompt), *expected[prompt], NEAR_TIE[dtype],
                                f"{arch}:{dtype} alone, {prompt!r}")
    for _ in range(5):  # all at once, until they overlapped and decoded together (almost always the first time)
        before = batched(base)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(lambda p: complete(base, arch, dtype, p), PROMPTS))
        for prompt, text in zip(PROMPTS, texts, strict=True):
            assert_same_greedy_text(text, *expected[prompt], NEAR_TIE[dtype], f"{arch}:{dtype} batched, {prompt!r}")
        if batched(base) > before:
            break
    else:
        pytest.fail("the requests never decoded together")
