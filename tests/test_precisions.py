"""Quantized precisions: the layers, values and bytes are mlx-lm's own (`mlx_lm.convert -q` with the
same settings), the estimate from the headers equals the loaded size, and what cannot be served is refused."""

from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.utils import compute_bits_per_weight, get_total_parameters, load_model, quantize_model

from models.errors import PrecisionUnavailableError
from models.testing.synthetic import llama_config, make_llama_checkpoint
from models.weights.catalog import default_model_ref
from models.weights.checkpoint import variant_spec
from models.weights.dtypes import Quantization, parse_precision
from models.weights.estimate import estimate_all, estimate_variant
from models.weights.loader import load_variant
from models.weights.memory import bits_per_weight
from models.weights.quantize import check_runs

BUNDLED = Path(default_model_ref())
# (precision, its float rest on the bundled bfloat16 model)
PRECISIONS = [("q8", "bfloat16"), ("q6", "bfloat16"), ("q5", "bfloat16"), ("q4", "bfloat16"), ("q3", "bfloat16"),
              ("q2", "bfloat16"), ("q4g32", "bfloat16"), ("q8g128", "bfloat16"), ("mxfp8", "bfloat16"),
              ("mxfp4", "bfloat16"), ("nvfp4", "bfloat16"), ("mixed_3_6", "bfloat16"), ("q4:float32", "float32"),
              ("q8:float16", "float16")]


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory):
    """A float32 llama of width 192, which 128 does not divide: at g128 only down_proj (input 384) quantizes."""
    config = llama_config(hidden=192, layers=2, vocab=128, intermediate=384, heads=3)
    return make_llama_checkpoint(tmp_path_factory.mktemp("odd") / "odd", config, dtype="float32")


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    config = llama_config(hidden=128, layers=2, vocab=64, intermediate=256)
    return make_llama_checkpoint(tmp_path_factory.mktemp("pq") / "q4", config, dtype="float16", quantize_bits=4)


def mlx_lm_quantized(folder: Path, name: str, float_dtype: str):
    """What `mlx_lm.convert --dtype <float> -q` makes of `folder`: cast, then quantize_model."""
    q = parse_precision(name).quantization
    model, config = load_model(folder)
    target = getattr(mx, float_dtype)
    model.update(tree_map(lambda v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v,
                          model.parameters()))
    predicate = mixed_quant_predicate_builder(q.recipe, model, q.group_size) if q.recipe else None
    return quantize_model(model, config, q.group_size, q.bits, mode=q.mode, quant_predicate=predicate)


def assert_same_arrays(ours, reference):
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(reference.parameters()))
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


@pytest.mark.parametrize("name,float_dtype", PRECISIONS)
def test_quantized_variant_is_mlx_lm_quantize_model_exactly(name, float_dtype):
    loaded = load_variant("tiny", BUNDLED, name)
    reference, config = mlx_lm_quantized(BUNDLED, name, float_dtype)
    assert_same_arrays(loaded.model, reference)
    assert loaded.config["quantization"] == config["quantization"]
    assert loaded.float_dtype == float_dtype
    # /memory's bytes, parameter count and bits per weight are mlx-lm's figures for that model
    nbytes = sum(v.nbytes for _, v in tree_flatten(reference.parameters()))
    assert loaded.stats.final_bytes == nbytes
    assert loaded.stats.parameter_count == get_total_parameters(reference)
    assert bits_per_weight(loaded.stats.final_bytes, loaded.stats.parameter_count) == round(
        compute_bits_per_weight(reference), 4)
    roles = loaded.stats.bytes_by_role
    assert sum(roles.values()) == nbytes and roles["packed_weights"] == loaded.stats.bytes_by_dtype["uint32"]
    assert (roles["biases"] > 0) == (parse_precision(name).quantization.mode == "affine")


@pytest.mark.parametrize("name", ["q4", "q4g128", "q8g32"])
def test_only_layers_the_group_size_divides_are_quantized_as_mlx_lm_does(odd_shapes, name):
    loaded = load_variant("odd", odd_shapes, name)
    reference, config = mlx_lm_quantized(odd_shapes, name, "bfloat16")  # a float32 checkpoint: bfloat16 rest
    assert_same_arrays(loaded.model, reference)
    quantized = {k for k, v in tree_flatten(loaded.model.parameters()) if v.dtype == mx.uint32}
    if name == "q4g128":
        assert quantized == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    else:
        assert {"model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"} <= quantized


@pytest.mark.parametrize("name", [p for p, _ in PRECISIONS] + ["float32", "float16", "bfloat16", "auto"])
def test_estimate_equals_the_loaded_bytes(name):
    estimate = estimate_variant(BUNDLED, name)
    loaded = load_variant("tiny", BUNDLED, name)
    assert estimate["bytes_by_dtype"] == loaded.stats.bytes_by_dtype
    assert estimate["total_bytes"] == loaded.stats.final_bytes
    assert estimate["parameter_count"] == loaded.stats.parameter_count
    assert estimate["dtype"] == loaded.dtype


@pytest.mark.parametrize("name", ["q8", "q4", "q4g128", "q3g32", "mxfp4", "nvfp4"])
def test_estimate_equals_the_loaded_bytes_where_some_layers_stay_float(odd_shapes, name):
    estimate = estimate_variant(odd_shapes, name)
    loaded = load_variant("odd", odd_shapes, name)
    assert estimate["bytes_by_dtype"] == loaded.stats.bytes_by_dtype
    assert estimate["total_bytes"] == loaded.stats.final_bytes


def test_the_float_rest_defaults_to_the_checkpoints_dtype_and_bfloat16_for_float32(odd_shapes):
    assert variant_spec(BUNDLED, "q4").float_dtype == "bfloat16"  # a bfloat16 checkpoint
    assert variant_spec(odd_shapes, "q4").float_dtype == "bfloat16"  # a float32 checkpoint
    assert variant_spec(odd_shapes, "q4:float32").key == "q4:float32"
    assert variant_spec(odd_shapes, "q4:bfloat16").key == "q4"  # the default is left out of the name
    assert variant_spec(odd_shapes, "float16").key == "float16"


def test_a_quantized_checkpoint_is_served_as_it_is_and_not_requantized(prequantized):
    assert variant_spec(prequantized, "auto").quantization == Quantization("affine", 4, 64)
    assert not variant_spec(prequantized, "q4").quantize
    assert variant_spec(prequantized, "q4").key == variant_spec(prequantized, "auto").key == "float16"
    assert variant_spec(prequantized, "q4:bfloat16").key == "bfloat16"
    for other in ("q8", "q4g32", "mxfp4", "mixed_3_6"):
        with pytest.raises(PrecisionUnavailableError, match="already quantized"):
            variant_spec(prequantized, other)
    assert [e["dtype"] for e in estimate_all(prequantized, include_quantized=True)] == [
        "float32", "float16", "bfloat16"]


@pytest.mark.parametrize("quantization", [Quantization("affine", 7, 64), Quantization("mxfp4", 4, 64),
                                          Quantization("nvfp4", 4, 32)])
def test_a_combination_mlx_cannot_run_is_refused_clearly(quantization):
    with pytest.raises(PrecisionUnavailableError, match="cannot run on this backend"):
        check_runs(quantization, "bfloat16")


def test_every_named_precision_runs_here():
    for name, float_dtype in PRECISIONS:
        check_runs(parse_precision(name).quantization, float_dtype)


def test_load_progress_is_logged_by_quarters(caplog):
    caplog.set_level("INFO", logger="models.weights.loader")
    load_variant("tiny", BUNDLED, "q4")
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading tiny/q4")]
    assert [m.split(": ")[1].split("%")[0] for m in progress] == ["25", "50", "75", "100"]


def test_load_progress_is_visible_while_loading_and_cleared_after():
    from models.weights.catalog import ModelCatalog
    from models.weights.registry import VariantRegistry

    seen = []
    registry = VariantRegistry(ModelCatalog({"tiny": BUNDLED}), "auto", 10**9,
                               warm=lambda loaded: seen.append(dict(registry.loading)))
    registry.get("tiny", "q4")
    assert seen[0]["dtype"] == "q4" and seen[0]["tensors_done"] == seen[0]["tensors"] > 0
    assert registry.loading is None and registry.report()["loading"] is None


def test_load_progress_counts_tensors_and_bytes_between_tensors():
    from models.weights.catalog import ModelCatalog
    from models.weights.registry import VariantRegistry

    registry = VariantRegistry(ModelCatalog({"tiny": BUNDLED}), "auto", 10**9)
    seen = []
    registry.between_tensors = lambda: seen.append(dict(registry.loading))
    variant = registry.get("tiny", "float32")  # cast from the bfloat16 checkpoint
    assert len(seen) == seen[-1]["tensors"] > 1
    assert {s["model"] for s in seen} == {"tiny"} and {s["dtype"] for s in seen} == {"float32"}
    assert [s["tensors_done"] for s in seen] == list(range(1, len(seen) + 1))
    done = [s["bytes_done"] for s in seen]
    assert done == sorted(done) and 0 < done[0] < done[-1] == seen[-1]["bytes"]
    assert seen[-1]["bytes"] == variant.loaded.stats.final_bytes
    assert registry.loading is None


def test_load_progress_bytes_of_a_quantized_load_are_the_variants():
    from models.weights.catalog import ModelCatalog
    from models.weights.registry import VariantRegistry

    registry = VariantRegistry(ModelCatalog({"tiny": BUNDLED}), "auto", 10**9)
    seen = []
    registry.between_tensors = lambda: seen.append(dict(registry.loading))
    variant = registry.get("tiny", "q4")
    assert seen[-1]["bytes_done"] == seen[-1]["bytes"] == variant.loaded.stats.final_bytes
