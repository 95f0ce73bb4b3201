import pytest

from models.dtypes import DTYPE_NAMES, normalize_dtype, will_cast
from models.errors import UnknownDtypeError


@pytest.mark.parametrize("name,expected", [
    ("auto", "auto"), ("float32", "float32"), ("FLOAT16", "float16"), ("bfloat16", "bfloat16"),
    ("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"), ("float", "float32"),
])
def test_names_and_aliases(name, expected):
    assert normalize_dtype(name) == expected


@pytest.mark.parametrize("name", ["float8", "int8", "", "float64", None, 16, "bfloat"])
def test_unknown_names_list_the_valid_ones(name):
    with pytest.raises(UnknownDtypeError) as info:
        normalize_dtype(name)
    for valid in DTYPE_NAMES:
        assert valid in str(info.value)


def test_will_cast_is_floating_only_and_honours_cast_predicate():
    assert will_cast("a.weight", "float32", None)
    assert not will_cast("a.weight", "uint32", None)
    assert not will_cast("a.weight", "int32", None)
    keep_bias = lambda path: "e_score_correction_bias" not in path  # noqa: E731
    assert not will_cast("gate.e_score_correction_bias", "float32", keep_bias)
    assert will_cast("gate.weight", "float32", keep_bias)
