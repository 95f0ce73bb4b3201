"""Giving a model's modules a faster twin class in place (same parameters, same state), by exact type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def swap_classes(model: Any, twins: dict[type, type], applies: Callable[[Any], bool] = lambda module: True) -> int:
    """Set the class of every module whose exact type has a twin (and that `applies`) to that twin; returns
    how many were swapped. Subclasses are left alone: they may override what the twin changes."""
    swapped = 0
    for _, module in model.named_modules():
        twin = twins.get(type(module))
        if twin is not None and applies(module):
            module.__class__ = twin
            swapped += 1
    return swapped
