"""The incremental detokenizer gives exactly the text a full decode gives, token by token."""

import pytest
from mlx_lm import load

from models.text.detokenizer import IncrementalDetokenizer, fast_decode, streaming_detokenizer
from tests.conftest import BUNDLED


@pytest.fixture(scope="module")
def tokenizer():
    return load(str(BUNDLED))[1]


@pytest.mark.parametrize("special", [False, True])  # with a leading <bos>: special tokens stay in the text
@pytest.mark.parametrize("decode", ["backend", "transformers"])
@pytest.mark.parametrize("text", ["17+25=42", "The cat sleeps in the garden.\nHello, Leo!", "  spaces  ", "üñí"])
def test_streamed_text_equals_the_full_decode(tokenizer, text, decode, special):
    ids = tokenizer.encode(text, add_special_tokens=special)
    detok = streaming_detokenizer(tokenizer) if decode == "backend" else \
        IncrementalDetokenizer(tokenizer._tokenizer.decode)
    pieces = []
    for token in ids:
        detok.add_token(token)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_the_naive_detokenizer_is_replaced_and_decodes_in_the_backend(tokenizer):
    assert isinstance(streaming_detokenizer(tokenizer), IncrementalDetokenizer)
    assert fast_decode(tokenizer._tokenizer) is not tokenizer._tokenizer.decode
