"""The cast while loading: set_dtype semantics, cast_predicate, quantized layers."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from models.weights.loader import cast_parameters


class Mixed(nn.Module):
    """float32, float16 and int32 parameters, a quantized layer, and a tensor the model keeps."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(64, 64)
        self.half = mx.ones((8,), dtype=mx.float16)
        self.counts = mx.arange(8, dtype=mx.int32)
        self.quant = nn.QuantizedLinear(64, 64, bias=True, group_size=64, bits=4)
        self.keep_bias = mx.zeros((4,), dtype=mx.float32)
        self._rope = mx.ones((4,), dtype=mx.float32)  # private: not a parameter, never cast

    @property
    def cast_predicate(self):
        return lambda path: "keep_bias" not in path


def dtypes(module):
    return {k: v.dtype for k, v in tree_flatten(module.parameters())}


def test_floating_parameters_are_cast_and_others_untouched():
    model = Mixed()
    before = dtypes(model)
    quant_weight = mx.array(model.quant.weight)
    cast_parameters(model, "bfloat16")
    after = dtypes(model)
    assert after["dense.weight"] == mx.bfloat16 and after["dense.bias"] == mx.bfloat16
    assert after["half"] == mx.bfloat16
    assert after["counts"] == mx.int32
    assert before["quant.weight"] == mx.uint32 and after["quant.weight"] == mx.uint32
    assert mx.array_equal(model.quant.weight, quant_weight).item()
    assert after["quant.scales"] == mx.bfloat16 and after["quant.biases"] == mx.bfloat16
    assert after["keep_bias"] == mx.float32  # kept by the model's cast_predicate
    assert model._rope.dtype == mx.float32


def test_auto_keeps_every_dtype_and_values_survive():
    model = Mixed()
    weight = mx.array(model.dense.weight)
    before = dtypes(model)
    cast_parameters(model, "auto")
    assert dtypes(model) == before
    assert mx.array_equal(model.dense.weight, weight).item()


def test_cast_values_match_astype():
    model = Mixed()
    expected = model.dense.weight.astype(mx.float16)
    cast_parameters(model, "float16")
    assert mx.array_equal(model.dense.weight, expected).item()
    quantized = model.quant(mx.ones((1, 64), dtype=mx.float16))
    assert quantized.dtype == mx.float16
