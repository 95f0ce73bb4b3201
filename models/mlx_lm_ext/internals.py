"""Accessors of mlx-lm's private helpers for the rest of models/, each with a fallback where the name
is gone (models.mlx_lm_ext.contract lists them)."""

from __future__ import annotations

from typing import Any

try:
    from mlx_lm.generate import StopSequences
except ImportError:  # another mlx-lm: rows stop at the batch's own stop tokens
    StopSequences = None


def no_stop_sequences() -> list | None:
    """BatchGenerator.insert's `stop_sequences` for one row that stops only at its max_tokens
    (ignore_eos); None, the batch's eos stops, where this mlx-lm has no StopSequences."""
    return [StopSequences(None)] if StopSequences is not None else None


def model_classes(config: dict) -> tuple[type, type]:
    """The mlx-lm model class and its arguments class that a config names, without building anything;
    raises ValueError for a model type mlx-lm does not know (or an mlx-lm without the helper)."""
    try:
        from mlx_lm.utils import _get_classes
    except ImportError as e:
        raise ValueError("this mlx-lm has no _get_classes") from e
    return _get_classes(config)


def model_class(config: dict) -> type | None:
    """The mlx-lm model class a config names; None if unknown."""
    try:
        return model_classes(config)[0]
    except Exception:  # an unknown model type, or an mlx-lm without the helper
        return None


def wrapped_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)
