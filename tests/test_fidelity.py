"""The dtype fidelity report (models.report.fidelity): its numbers against an independent computation,
float32 against itself, non-finite detection, the task accuracy, stepping, the chart and the probes."""

from __future__ import annotations

from models.platform.blas import configure_blas

configure_blas("auto")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlx_lm import load as mlx_lm_load  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from models.errors import PrecisionUnavailableError  # noqa: E402
from models.report.chart import render_chart, render_svg  # noqa: E402
from models.report.fidelity import FidelityJob, default_report_dtypes, run_report  # noqa: E402
from models.report.probes import (  # noqa: E402
    BUNDLED_PROMPTS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    load_prompt_file,
    parse_prompts,
    probe_set,
)
from models.testing.synthetic import llama_config, make_llama_checkpoint  # noqa: E402
from models.weights.catalog import default_model_ref  # noqa: E402

BUNDLED = Path(default_model_ref())
PROBES = ["17+25=", "The small cat sees the", "Alice likes to"]
GREEDY = 16
METRICS = ("top1_agreement", "kl_mean", "kl_max", "max_abs_logit_diff", "mean_greedy_agreement_tokens",
           "nonfinite_share", "task_accuracy", "bytes_by_dtype", "total_bytes", "load_seconds",
           "prefill_tok_s", "decode_tok_s")


@pytest.fixture(scope="module")
def bundled_report() -> dict:
    return run_report(BUNDLED, ["float32", "bfloat16", "float16", "auto"], PROBES, greedy_tokens=GREEDY,
                      speed_repeats=1)


def _small_llama(folder: Path, seed: int = 0) -> Path:
    return make_llama_checkpoint(folder, llama_config(64, 2, 100, context=256), dtype="float32", seed=seed)


# ---- independent computation ------------------------------------------------------------------
def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _independent(dtype: str) -> dict:
    """Teacher-forced comparison written directly with mlx-lm: load + set_dtype, full forwards, no cache."""
    ref_model, tokenizer = mlx_lm_load(str(BUNDLED))
    ref_model.set_dtype(mx.float32)
    model, _ = mlx_lm_load(str(BUNDLED))
    model.set_dtype(getattr(mx, dtype))
    eos = set(tokenizer.eos_token_ids)
    positions = agree = 0
    max_diff = kl_max = kl_sum = 0.0
    greedy_common = []
    for prompt in PROBES:
        ids = tokenizer.encode(prompt)

        def greedy(m, ids=ids):
            seq, out = list(ids), []
            for _ in range(GREEDY):
                token = int(mx.argmax(m(mx.array(seq)[None])[0, -1].astype(mx.float32)).item())
                out.append(token)
                if token in eos:
                    break
                seq.append(token)
            return out

        ref_greedy = greedy(ref_model)
        seq = ids + [t for t in ref_greedy if t not in eos]
        a = ref_model(mx.array(seq)[None])[0].astype(mx.float32)
        b = model(mx.array(seq)[None])[0].astype(mx.float32)
        positions += len(seq)
        agree += int(mx.sum(mx.argmax(a, axis=-1) == mx.argmax(b, axis=-1)).item())
        max_diff = max(max_diff, mx.max(mx.abs(a - b)).item())
        # KL in float64 (numpy): float32 rounding alone is ~1e-6, the size of a 16-bit dtype's KL
        la, lb = (_log_softmax64(np.array(x)) for x in (a, b))
        kl = np.maximum((np.exp(la) * (la - lb)).sum(axis=-1), 0)
        kl_max, kl_sum = max(kl_max, float(kl.max())), kl_sum + float(kl.sum())
        mine = greedy(model)
        greedy_common.append(next((k for k, (x, y) in enumerate(zip(mine, ref_greedy, strict=False)) if x != y),
                                  min(len(mine), len(ref_greedy))))
    return {"top1_agreement": agree / positions, "max_abs_logit_diff": max_diff, "kl_max": kl_max,
            "kl_mean": kl_sum / positions, "mean_greedy_agreement_tokens": sum(greedy_common) / len(PROBES),
            "positions": positions}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_numbers_match_an_independent_computation(bundled_report, dtype):
    entry = bundled_report["dtypes"][dtype]
    expected = _independent(dtype)
    assert entry["positions"] == expected["positions"]
    assert entry["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1e-12)
    assert entry["max_abs_logit_diff"] == pytest.approx(expected["max_abs_logit_diff"], rel=1e-4, abs=1e-5)
    assert entry["kl_max"] == pytest.approx(expected["kl_max"], rel=1e-3, abs=2e-8)
    assert entry["kl_mean"] == pytest.approx(expected["kl_mean"], rel=1e-3, abs=2e-8)
    assert 0 < entry["kl_mean"] <= entry["kl_max"]
    assert entry["mean_greedy_agreement_tokens"] == pytest.approx(expected["mean_greedy_agreement_tokens"])
    assert entry["max_abs_logit_diff"] > 0  # a 16-bit dtype is not float32


def test_float32_against_itself_is_exact(bundled_report):
    entry = bundled_report["dtypes"]["float32"]
    assert entry["top1_agreement"] == 1.0
    assert entry["kl_mean"] == 0.0 and entry["kl_max"] == 0.0
    assert entry["max_abs_logit_diff"] == 0.0
    assert entry["nonfinite_share"] == 0.0
    for p in entry["per_prompt"]:
        assert p["greedy_agreement_tokens"] == p["reference_greedy_tokens"]


def test_report_shape_bytes_and_task_accuracy(bundled_report):
    r = bundled_report
    json.dumps(r, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere
    assert r["model"] == "tiny-arith" and r["reference"] == "float32" and r["probe_prompts"] == len(PROBES)
    assert list(r["dtypes"]) == ["float32", "bfloat16", "float16", "auto"]
    for entry in r["dtypes"].values():
        assert set(METRICS) <= set(entry)
        assert entry["prefill_tok_s"] > 0 and entry["decode_tok_s"] > 0
        assert 0.0 <= entry["top1_agreement"] <= 1.0
    f32, bf16, f16 = (r["dtypes"][d] for d in ("float32", "bfloat16", "float16"))
    assert f32["bytes_by_dtype"] == {"float32": f32["total_bytes"]}
    assert bf16["bytes_by_dtype"] == {"bfloat16": f32["total_bytes"] // 2}
    assert f16["total_bytes"] == f32["total_bytes"] // 2
    assert r["dtypes"]["auto"]["alias_of"] == "bfloat16"  # the bundled checkpoint is stored in bfloat16
    assert r["task"]["prompts"] == 100
    assert f32["task_accuracy"] >= 0.9
    assert bf16["task_accuracy"] is not None and f16["task_accuracy"] is not None
    assert r["warnings"] == []  # a normal model has no non-finite logits in any dtype


def test_float16_overflow_is_detected(tmp_path):
    folder = _small_llama(tmp_path / "overflow")
    weights = mx.load(str(folder / "model.safetensors"))
    # weights still fit float16 (|w| <= 0.0625 * 5e5 < 65504), but the logits do not
    weights["lm_head.weight"] = weights["lm_head.weight"] * 5e5
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    r = run_report(folder, ["bfloat16", "float16"], PROBES, greedy_tokens=4, speed_repeats=1, decode_tokens=4)
    json.dumps(r, allow_nan=False)
    assert r["dtypes"]["float16"]["nonfinite_share"] > 0
    assert r["dtypes"]["float32"]["nonfinite_share"] == 0 and r["dtypes"]["bfloat16"]["nonfinite_share"] == 0
    assert r["dtypes"]["bfloat16"]["kl_mean"] is not None
    assert len(r["warnings"]) == 1 and "float16" in r["warnings"][0] and "%" in r["warnings"][0]
    assert r["dtypes"]["float32"]["task_accuracy"] is None  # no task for a model that is not the bundled one


def test_job_runs_in_steps_and_can_be_cancelled(tmp_path):
    folder = _small_llama(tmp_path / "small", seed=1)
    job = FidelityJob("small", folder, ["float16"], PROBES[:2], task=None, speed_repeats=1, greedy_tokens=4)
    progress, steps = [], 0
    while not job.step():
        steps += 1
        assert job.result is None
        progress.append(job.progress)
    assert progress == sorted(progress) and 0 < progress[0] < 1.0
    assert job.progress == 1.0 and job.done and job.status()["stage"] == "done"
    # units: reference load + speed + 2 prompts; float16 load + speed + 2 prompts; float32 2 prompts; summary
    assert len(set(progress)) + 1 == 2 + 2 + 4 + 2 + 1
    # ...each cut into steps of one model call: the speed runs alone take a step per decoded token
    assert steps > 2 * 2 * job.decode_tokens
    assert job.step() is True and job.result["dtypes"]["float16"]["nonfinite_share"] == 0.0
    assert job.result["warnings"] == []

    cancelled = FidelityJob("small", folder, ["bfloat16"], PROBES[:1], task=None)
    cancelled.step()
    cancelled.close()
    assert cancelled.error == "cancelled"
    with pytest.raises(RuntimeError, match="cancelled"):
        cancelled.step()


def test_chart_renders_png_and_svg(bundled_report, tmp_path):
    png = render_chart(bundled_report, tmp_path / "chart.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    svg = render_svg(bundled_report)
    assert "<svg" in svg and "float16" in svg
    assert render_chart(bundled_report, tmp_path / "chart.svg").read_text().count("<svg") == 1
    with pytest.raises(ValueError, match="png or .svg"):
        render_chart(bundled_report, tmp_path / "chart.gif")


def test_default_precisions_are_those_the_device_and_checkpoint_can_have(tmp_path):
    bundled = default_report_dtypes(BUNDLED)
    assert bundled[:3] == ("float32", "bfloat16", "float16") and {"q8", "q4"} <= set(bundled)
    config = llama_config(hidden=128, layers=2, vocab=64, intermediate=256)
    prequantized = make_llama_checkpoint(tmp_path / "q4", config, dtype="float16", quantize_bits=4)
    # an already quantized checkpoint is measured as it is, not requantized
    assert default_report_dtypes(prequantized) == ("float32", "bfloat16", "float16", "q4")
    job = FidelityJob("q4", prequantized, ["q4", "float16"], PROBES[:1], task=None)
    assert job.dtypes == ["float32", "q4", "float16"] and job._order == ["float32", "float16"]  # q4 is its float16
    with pytest.raises(PrecisionUnavailableError, match="already quantized"):
        FidelityJob("q4", prequantized, ["q8"], PROBES[:1], task=None)
    with pytest.raises(ValueError, match="not fit"):
        FidelityJob("tiny", BUNDLED, ["fit"], PROBES[:1], task=None)


# ---- probes -----------------------------------------------------------------------------------
def test_bundled_probe_set():
    assert 12 <= len(BUNDLED_PROMPTS) <= 24 and any("+" in p for p in BUNDLED_PROMPTS)
    assert probe_set() == list(BUNDLED_PROMPTS)
    assert probe_set(["17+25=", "new one"]) == [*BUNDLED_PROMPTS, "new one"]  # duplicates dropped
    assert probe_set(["a b"], include_bundled=False) == ["a b"]


def test_prompt_files(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n  second, indented\r\nthird\n")
    assert load_prompt_file(plain) == ["first prompt", "  second, indented", "third"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\\nb"}\n{"prompt": "c", "id": 2}\n')
    assert load_prompt_file(jsonl) == ["a\nb", "c"]
    assert parse_prompts('{"prompt": "x"}\n') == ["x"]  # detected without a suffix


@pytest.mark.parametrize(("text", "message"), [
    ("", "no prompts"),
    ("\n".join(f"p{i}" for i in range(MAX_PROMPTS + 1)), f"more than {MAX_PROMPTS}"),
    ("x" * (MAX_PROMPT_CHARS + 1), f"at most {MAX_PROMPT_CHARS}"),
    ('{"prompt": "ok"}\n{"prompt": ', "line 2 is not valid JSON"),
    ('{"text": "no prompt field"}', "line 1 must be a JSON object"),
    ('{"prompt": 5}', "must be a string"),
])
def test_prompt_file_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompts(text)


def test_prompt_file_limits(tmp_path):
    assert len(parse_prompts("\n".join("y" * MAX_PROMPT_CHARS for _ in range(MAX_PROMPTS)))) == MAX_PROMPTS
    with pytest.raises(ValueError, match="cannot read"):
        load_prompt_file(tmp_path / "missing.txt")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        load_prompt_file(binary)
    with pytest.raises(ValueError, match="empty"):
        FidelityJob("m", tmp_path, ["float16"], ["  "], task=None)


# ---- KV cache precision -----------------------------------------------------------------------
KV_CONTEXTS = (64, 160, 1024)  # the bundled model's context is 256: 1024 is scored at its longest, 224
KV_POSITIONS = 32


@pytest.fixture(scope="module")
def kv_report() -> dict:
    return run_report(BUNDLED, ["float32+kv8", "float32+kv4"], PROBES, task=None, greedy_tokens=GREEDY,
                      speed_repeats=1, decode_tokens=4, speed_batch=2, kv_contexts=KV_CONTEXTS,
                      kv_positions=KV_POSITIONS)


def _kv_context_independent(bits: int, context: int) -> dict:
    """mlx-lm alone: the probe text repeated, `context` tokens into a plain KVCache, which is then quantized
    (QuantizedKVCache, groups of 32: the head size) or not; the next KV_POSITIONS tokens teacher-forced."""
    model, tokenizer = mlx_lm_load(str(BUNDLED))
    model.set_dtype(mx.float32)
    ids: list[int] = []
    while len(ids) < context + KV_POSITIONS:
        for prompt in PROBES:
            ids += tokenizer.encode(prompt + " ")
    ids = ids[:context + KV_POSITIONS]

    def scored(quantize: bool) -> np.ndarray:
        cache = make_prompt_cache(model)
        model(mx.array(ids[:context])[None], cache=cache)
        if quantize:
            cache = [c.to_quantized(group_size=32, bits=bits) for c in cache]
        return np.array(model(mx.array(ids[context:])[None], cache=cache)[0].astype(mx.float32))

    a, b = scored(False), scored(True)
    la, lb = _log_softmax64(a), _log_softmax64(b)
    kl = np.maximum((np.exp(la) * (la - lb)).sum(axis=-1), 0)
    return {"top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max())}


def test_kv_precisions_are_reported_with_bytes_and_fidelity_at_growing_context(kv_report):
    entries = kv_report["dtypes"]
    assert list(entries) == ["float32", "float32+kv8", "float32+kv4"]
    float_kv = entries["float32"]["kv_cache"]
    assert float_kv["dtype"] == "float" and float_kv["contexts"] == [] and float_kv["bytes_per_token"] == 4096
    for name, bits in (("float32+kv8", 8), ("float32+kv4", 4)):
        kv = entries[name]["kv_cache"]
        # 4 layers x 4 KV heads x (K, V) x (32 dims at `bits`, a float32 scale and bias per group of 32)
        assert kv["bytes_per_token"] == 4 * 4 * 2 * (32 * bits // 8 + 2 * 4)
        assert kv["bytes_ratio"] == round(kv["bytes_per_token"] / 4096, 4) and kv["reference"] == "float32"
        assert [c["context"] for c in kv["contexts"]] == [64, 160, 224] and kv["beyond_model_context"] == [1024]
        assert all(c["positions"] == KV_POSITIONS for c in kv["contexts"])
        assert kv["decode_tok_s_ratio"] > 0 and kv["decode_batch_tok_s_ratio"] > 0  # against float32's speed
        # the probe figures go through the quantized cache as served: not float32's exact zero
        assert entries[name]["kl_mean"] > 0 and entries[name]["total_bytes"] == entries["float32"]["total_bytes"]
    for low, high in zip(entries["float32+kv4"]["kv_cache"]["contexts"],
                         entries["float32+kv8"]["kv_cache"]["contexts"], strict=True):
        assert low["kl_mean"] > high["kl_mean"]  # fewer bits, further from the float cache
    assert entries["float32+kv4"]["kl_mean"] > entries["float32+kv8"]["kl_mean"]


@pytest.mark.parametrize("bits,context", [(8, 160), (4, 64)])
def test_kv_context_figures_match_an_independent_computation(kv_report, bits, context):
    measured = next(c for c in kv_report["dtypes"][f"float32+kv{bits}"]["kv_cache"]["contexts"]
                    if c["context"] == context)
    expected = _kv_context_independent(bits, context)
    assert measured["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1 / KV_POSITIONS)
    assert measured["kl_mean"] == pytest.approx(expected["kl_mean"], rel=0.05, abs=1e-6)
    assert measured["kl_max"] == pytest.approx(expected["kl_max"], rel=0.05, abs=1e-6)
