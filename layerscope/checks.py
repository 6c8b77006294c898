"""Argument checks shared by the public functions: whole numbers in a range, finite numbers,
flags. Each raises the caller's :class:`~layerscope.errors.LayerscopeError` subclass with the
argument's name, the value given and what is allowed.
"""

from __future__ import annotations

import math

from layerscope.errors import LayerscopeError

MAX_SIZE = 2**31 - 1
"""Largest tensor dimension (batch, sequence length, LoRA rank) layerscope traces: CUDA kernels
index many tensors with 32-bit integers, and no real run comes near it."""
MAX_COUNT = 2**53
"""Largest count (samples, epochs, GPUs, bytes) layerscope computes with: beyond it a float no
longer holds every whole number, so times and costs would be wrong."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..."


def whole(value: object, name: str, error: type[LayerscopeError], *, minimum: int = 0,
          maximum: int = MAX_COUNT) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``; else ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        top = "2**31 - 1" if maximum == MAX_SIZE else "2**53" if maximum == MAX_COUNT else str(maximum)
        raise error(f"{name} must be an int >= {minimum}, got {_shown(value)} (allowed: {minimum} to {top})")
    return value


def finite(value: object, name: str, error: type[LayerscopeError], *, minimum: float = 0.0) -> float:
    """``value`` as a float if it is a finite real number (not a bool) >= ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = math.nan
    if ok:
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:  # an int beyond the float range
            ok = False
    if not ok or not math.isfinite(number) or number < minimum:
        raise error(f"{name} must be a finite number >= {minimum:g}, got {_shown(value)}")
    return number


def flag(value: object, name: str, error: type[LayerscopeError]) -> bool:
    """``value`` if it is a bool (``"no"``, 0 or None are not)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be a bool (True or False), got {_shown(value)}")
    return value
