"""Byte amounts as operators write them ("12GiB", "500MB", "123456", or a share of memory like "0.5").
Pure Python, so settings are checked before MLX is imported."""

from __future__ import annotations

import math
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Size:
    """Either a byte count or a share of the device memory (`share` in (0, 1])."""

    bytes: int = 0
    share: float | None = None

    def of(self, total: int) -> int:
        return int(total * self.share) if self.share is not None else self.bytes


def parse_size(value: str, *, allow_zero: bool = False) -> Size:
    """The Size `value` writes; ValueError with a one-line reason if it is not one."""
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number):]
    if unit not in _UNITS:
        raise ValueError(f"{value!r}: unknown unit (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{value!r} is not a size (e.g. 12GiB, 500MB, 123456, or a share such as 0.5)") from None
    if not math.isfinite(amount):
        raise ValueError(f"{value!r} is not a finite size")
    if unit == "" and 0 < amount <= 1 and "." in number:
        return Size(share=amount)
    count = int(amount * _UNITS[unit]) if amount > 0 else 0
    if count == 0 and not (amount == 0 and allow_zero):
        raise ValueError(f"{value!r} must be positive")
    return Size(count)
