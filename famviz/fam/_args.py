"""Argument checks shared by the FAM penalty, SAM and the training loop."""

from __future__ import annotations

import math

from torch import Tensor

from ..measures.relative import NORMALIZATIONS  # None: the paper's κ; "m": κ / inputs


def number(name: str, value, *, low: float | None = None, strict: bool = False,
            high: float | None = None, integer: bool = False) -> float:
    """``value`` as a float (int if ``integer``) within bounds, else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, Tensor) and value.numel() == 1
    ):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if integer:
        if value != int(value):
            raise ValueError(f"{name} must be an integer, got {value}")
        value = int(value)
    if low is not None and (value < low or (strict and value == low)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high:g}, got {value}")
    return value


def check_normalize(normalize) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: None, 'm'")


