import pytest

from models.errors import UnknownDtypeError
from models.weights.dtypes import (
    DTYPE_NAMES,
    FIT,
    Quantization,
    accepted_names,
    normalize_dtype,
    parse_precision,
    quantization_names,
    will_cast,
)


@pytest.mark.parametrize("name,expected", [
    ("auto", "auto"), ("float32", "float32"), ("FLOAT16", "float16"), ("bfloat16", "bfloat16"),
    ("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"), ("float", "float32"),
])
def test_names_and_aliases(name, expected):
    assert normalize_dtype(name) == expected


@pytest.mark.parametrize("name,expected", [
    ("q4", "q4"), ("Q4", "q4"), ("q4g64", "q4"), ("q4g32", "q4g32"), ("q8g128", "q8g128"),
    ("int8", "q8"), ("8bit", "q8"), ("int4", "q4"), ("4bit", "q4"), ("q3", "q3"), ("q2", "q2"),
    ("mxfp8", "mxfp8"), ("mxfp4", "mxfp4"), ("NVFP4", "nvfp4"), ("mixed_3_6", "mixed_3_6"),
    ("q4:float16", "q4:float16"), ("q4:bf16", "q4:bfloat16"), ("int4:fp32", "q4:float32"),
    ("q4g64:float16", "q4:float16"), ("fit", "fit"), ("FIT", "fit"),
])
def test_precision_names_and_aliases(name, expected):
    assert normalize_dtype(name) == expected


@pytest.mark.parametrize("name,quantization,float_dtype", [
    ("q4", Quantization("affine", 4, 64), None),
    ("q6g128:float32", Quantization("affine", 6, 128), "float32"),
    ("mxfp8", Quantization("mxfp8", 8, 32), None),
    ("mxfp4", Quantization("mxfp4", 4, 32), None),
    ("nvfp4:float16", Quantization("nvfp4", 4, 16), "float16"),
    ("mixed_4_6", Quantization("affine", 4, 64, recipe="mixed_4_6"), None),
    ("bfloat16", None, "bfloat16"),
    ("auto", None, None),
])
def test_a_precision_names_the_quantization_and_the_float_rest(name, quantization, float_dtype):
    precision = parse_precision(name)
    assert precision.quantization == quantization and precision.float_dtype == float_dtype


@pytest.mark.parametrize("name", ["float8", "int3", "q7", "q1", "q4g16", "q4g256", "mxfp4g64", "q4:int8",
                                  "auto:float16", "float16:bfloat16", "fit:float16", "q4:", "",
                                  "float64", None, 16, "bfloat"])
def test_unknown_names_list_the_valid_ones(name):
    with pytest.raises(UnknownDtypeError) as info:
        normalize_dtype(name)
    for valid in (*DTYPE_NAMES, FIT, *quantization_names()):
        assert valid in str(info.value)


def test_every_accepted_spelling_is_valid_and_canonical_names_round_trip():
    names = accepted_names()
    assert len(names) == len(set(names))
    for name in names:
        canonical = normalize_dtype(name)
        assert normalize_dtype(canonical) == canonical
        assert canonical in names


def test_will_cast_is_floating_only_and_honours_cast_predicate():
    assert will_cast("a.weight", "float32", None)
    assert not will_cast("a.weight", "uint32", None)
    assert not will_cast("a.weight", "int32", None)
    keep_bias = lambda path: "e_score_correction_bias" not in path  # noqa: E731
    assert not will_cast("gate.e_score_correction_bias", "float32", keep_bias)
    assert will_cast("gate.weight", "float32", keep_bias)
